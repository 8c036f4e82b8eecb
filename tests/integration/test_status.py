"""`status` (the `status --json` contract of ARCHITECTURE.md) and `teardown`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from cdc_sync import commands
from cdc_sync.embedded import Cluster
from cdc_sync.errors import CdcSyncError
from cdc_sync.protocol import Lsn

from .conftest import Env
from .helpers import (
    assert_converged,
    execute,
    make_settings,
    progress_lsn,
    replicating,
    run_cli,
    running_pipeline,
    scalar,
    slot_row,
    wait_until_caught_up,
    write_config,
)

SOURCE_KEYS = {"name", "slot", "active", "current_lsn", "confirmed_flush_lsn", "retained_bytes"}
SITE_KEYS = {"name", "reachable", "applied_lsn", "lag_bytes", "lag_seconds", "last_commit_ts"}
LSN_RE = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")


def _check_shape(data: dict[str, object], site_names: list[str]) -> None:
    assert set(data) >= {"source", "sites"}
    source = data["source"]
    assert isinstance(source, dict) and SOURCE_KEYS <= set(source), source
    sites = data["sites"]
    assert isinstance(sites, list) and [s["name"] for s in sites] == site_names
    for site in sites:
        assert SITE_KEYS <= set(site), site


def test_status_reports_slot_and_sites(env: Env) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = env.settings()
    before_init = commands.status(settings)
    _check_shape(before_init, ["site1", "site2"])
    assert before_init["source"]["active"] is False
    assert before_init["source"]["confirmed_flush_lsn"] is None  # no slot yet

    with replicating(settings) as pipe:
        execute(env.source, "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 10) g")
        marker = wait_until_caught_up(settings, pipeline=pipe)
        time.sleep(0.2)
        st = commands.status(settings)
        _check_shape(st, ["site1", "site2"])
        src = st["source"]
        assert src["name"] == "hq" and src["slot"] == settings.source.slot
        assert src["active"] is True
        assert LSN_RE.match(src["current_lsn"]) and LSN_RE.match(src["confirmed_flush_lsn"])
        assert isinstance(src["retained_bytes"], int) and src["retained_bytes"] >= 0
        current = Lsn.parse(src["current_lsn"])
        for site, dsn in zip(st["sites"], env.sites, strict=True):
            assert site["reachable"] is True
            applied = Lsn.parse(site["applied_lsn"])
            assert applied > marker
            assert applied >= progress_lsn(dsn, "hq")  # type: ignore[operator]
            assert site["lag_bytes"] == max(0, current - applied)
            assert isinstance(site["lag_seconds"], float)
            ts = datetime.fromisoformat(site["last_commit_ts"])
            assert ts.tzinfo is not None and abs(time.time() - ts.timestamp()) < 60
    after = commands.status(settings)
    assert after["source"]["active"] is False


def test_status_of_an_unreachable_site(env: Env) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)")
    commands.init(env.settings())
    gone = env.sites[0].rsplit("/", 1)[0] + "/no_such_db"
    st = commands.status(make_settings(env.source, [env.sites[0], gone],
                                       slot=env.settings().source.slot))
    _check_shape(st, ["site1", "site2"])
    assert st["sites"][0]["reachable"] is True
    assert st["sites"][1]["reachable"] is False
    assert st["sites"][1]["applied_lsn"] is None and st["sites"][1]["lag_bytes"] is None


def test_idle_source_lag_reaches_zero_with_sites_in_another_cluster(
        env: Env, make_cluster: Callable[..., Cluster]) -> None:
    offices = make_cluster()
    sites = [offices.create_database("berlin"), offices.create_database("tokyo")]
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, v text)",
            "INSERT INTO t VALUES (1, 'a')")
    settings = env.settings(sites=sites)
    with replicating(settings) as pipe:
        for i in range(5):
            execute(env.source, "UPDATE t SET v = %s", params=(f"b{i}",))
        assert_converged(settings, pipe)
        started = time.monotonic()
        deadline = started + 10
        lags: list[object] = []
        while True:
            st = commands.status(settings)
            lags = [s["lag_bytes"] for s in st["sites"]]
            if lags == [0, 0]:
                break
            assert time.monotonic() < deadline, f"lag_bytes still {lags} after 10 s: {st}"
            time.sleep(0.2)
        assert [s["lag_seconds"] for s in st["sites"]] == [0.0, 0.0]
        # and the slot is confirmed up to what the sites hold, soon after
        applied = min(Lsn.parse(s["applied_lsn"]) for s in st["sites"])
        while Lsn.parse(commands.status(settings)["source"]["confirmed_flush_lsn"]) < applied:
            assert time.monotonic() < deadline + 5, "the slot is not confirmed"
            time.sleep(0.2)


def test_idle_lag_reaches_zero_after_unpublished_wal(
        env: Env, make_cluster: Callable[..., Cluster]) -> None:
    """WAL that belongs to no published transaction right after a published one (here: a
    table outside the publication). The sites hold everything; within a few seconds of the
    source going idle they must show it. Two rounds of 3 s each: a bgwriter running-xacts
    record (every 15 s at most) can rescue at most one of them.

    (Regression: keepalives closer than KEEPALIVE_DISPATCH_INTERVAL to the previous one were
    dropped, and lag_bytes stayed > 0 until the next WAL, 10-30 s later.)"""
    offices = make_cluster()
    sites = [offices.create_database("berlin")]
    execute(env.source, "CREATE TABLE pub_t (id int PRIMARY KEY, v int)",
            "CREATE TABLE other (id int PRIMARY KEY, v int)",
            "INSERT INTO pub_t VALUES (1, 0)", "INSERT INTO other VALUES (1, 0)")
    settings = env.settings(sites=sites, tables=["public.pub_*"])
    stuck = 0
    with replicating(settings) as pipe:
        assert_converged(settings, pipe, ["public.pub_t"])
        for _ in range(2):
            time.sleep(0.6)
            execute(env.source, "UPDATE pub_t SET v = v + 1")
            execute(env.source, "UPDATE other SET v = v + 1")
            deadline = time.monotonic() + 3
            while commands.status(settings)["sites"][0]["lag_bytes"] != 0:
                if time.monotonic() > deadline:
                    stuck += 1
                    break
                time.sleep(0.1)
    assert stuck == 0, f"lag_bytes stayed > 0 with an idle source in {stuck} of 2 rounds"


def test_cli_status_json(env: Env, tmp_path: Path) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    data = env.settings_dict()
    config = write_config(tmp_path / "cdc-sync.toml", data)
    settings = env.settings()
    commands.init(settings)
    with running_pipeline(settings) as pipe:
        execute(env.source, "INSERT INTO t VALUES (2)")
        wait_until_caught_up(settings, pipeline=pipe)
        proc = run_cli("status", "--json", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    obj = json.loads(lines[0])
    _check_shape(obj, ["site1", "site2"])
    assert obj["source"]["slot"] == settings.source.slot
    assert all(s["reachable"] for s in obj["sites"])
    # the human form works too
    human = run_cli("status", "-c", str(config))
    assert human.returncode == 0 and "site1" in human.stdout


def test_teardown_drops_slot_and_publication(env: Env, tmp_path: Path) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)")
    settings = env.settings()
    commands.init(settings)
    slot, pub = settings.source.slot, settings.source.publication
    assert slot_row(env.source, slot) is not None
    with running_pipeline(settings) as pipe:
        wait_until_caught_up(settings, pipeline=pipe)
        with pytest.raises(CdcSyncError, match="in use"):  # not while `run` streams
            commands.teardown(settings)
    dropped = commands.teardown(settings)
    assert dropped == [f"slot {slot}", f"publication {pub}"]
    assert slot_row(env.source, slot) is None
    assert scalar(env.source, "SELECT count(*) FROM pg_publication WHERE pubname = %s",
                  (pub,)) == 0
    assert commands.teardown(settings) == []  # idempotent
    config = write_config(tmp_path / "c.toml", env.settings_dict())
    proc = run_cli("teardown", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    # and init sets everything up again
    report = commands.init(settings)
    assert report.slot_created

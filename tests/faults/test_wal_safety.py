"""WAL safety: the slot never holds WAL back silently, and an idle published database on a busy
cluster does not make it hold WAL at all."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from integration.helpers import (
    assert_converged,
    current_lsn,
    execute,
    replicating,
    run_cli,
    settings_dict,
    slot_row,
    wait_for,
    write_config,
)

from cdc_sync import commands
from cdc_sync.config import settings_from_dict
from cdc_sync.embedded import Cluster
from cdc_sync.protocol import Lsn

from .helpers import PASSWORD, with_password


def test_status_warns_about_the_site_holding_wal_back(make_cluster: Callable[..., Cluster],
                                                      new_db: Callable[..., str],
                                                      tmp_path: Path) -> None:
    office = make_cluster()
    down, up, source = office.create_database("berlin"), new_db("tokyo"), new_db("src")
    execute(source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    data = settings_dict(source, [down, up], site_names=["berlin", "tokyo"])
    data["source"]["max_retained_bytes"] = 1000
    settings = settings_from_dict(data)
    with replicating(settings) as pipe:
        execute(source, "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g")
        assert_converged(settings, pipe)
        st = commands.status(settings)
        assert isinstance(st["source"]["retained_bytes"], int)
        assert st["source"]["retained_bytes"] >= 0
        office.stop()
        for i in range(5):
            execute(source, "UPDATE t SET v = %s", params=(f"w{i}",))
        st = commands.status(settings)
        assert st["source"]["retained_bytes"] > 1000, st
        warning = st["source"].get("warning")
        assert warning and "berlin" in warning and "tokyo" not in warning, st
        assert str(st["source"]["retained_bytes"]) in warning and "1000" in warning
        # the same through the CLI, with a password in the DSNs
        data["source"]["dsn"] = with_password(source)
        data["sites"] = [{"name": s["name"], "dsn": with_password(s["dsn"])}
                         for s in data["sites"]]
        proc = run_cli("status", "-c", str(write_config(tmp_path / "c.toml", data)), "--json")
        assert PASSWORD not in proc.stdout + proc.stderr
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)
        assert "berlin" in shown["source"]["warning"]
        assert [s["reachable"] for s in shown["sites"]] == [False, True]
        office.start()
        assert_converged(settings, pipe, timeout=60)


def test_an_idle_published_database_on_a_busy_cluster_does_not_hold_wal(
        make_cluster: Callable[..., Cluster], new_db: Callable[..., str]) -> None:
    """Lots of WAL written by another database of the source's cluster: the slot is confirmed
    past it (keepalives, heartbeats every second) and retains little of it."""
    server = make_cluster()
    source, busy = server.create_database("src"), server.create_database("busy")
    site = new_db("site")
    execute(source, "CREATE TABLE t (id int PRIMARY KEY, v text)", "INSERT INTO t VALUES (1, 'a')")
    execute(busy, "CREATE TABLE junk (id int, pad text)")
    data = settings_dict(source, [site])
    data["source"]["heartbeat_seconds"] = 1
    settings = settings_from_dict(data)
    slot = settings.source.slot
    with replicating(settings) as pipe:
        assert_converged(settings, pipe)
        start = current_lsn(source)
        for _ in range(4):
            execute(busy, "INSERT INTO junk SELECT g, repeat(md5(g::text), 30) "
                          "FROM generate_series(1, 10000) g")
            time.sleep(0.5)
        end = current_lsn(source)
        written = end - start
        assert written > 16 << 20, f"only {written} bytes of WAL written"

        def confirmed() -> Lsn:
            row = slot_row(source, slot)
            assert row is not None
            return Lsn.parse(row["confirmed_flush_lsn"])

        wait_for(lambda: confirmed() >= end, 15, f"the slot to be confirmed past {end}")
        execute(server.dsn(), "CHECKPOINT")  # also a running-xacts record: restart_lsn may move
        wait_for(lambda: commands.status(settings)["source"]["retained_bytes"] < written // 4,
                 30, "the slot to release the other database's WAL")
        assert "warning" not in commands.status(settings)["source"]

"""End to end: `cdc-sync run` as a subprocess delivering to a real webhook receiver.

- `test_webhook_delivers_every_change_across_kills`: pgbench writes to the source while the
  replicator is SIGKILLed twice in the middle of a delivery (the receiver holds the POST open,
  so the batch is received but never acknowledged) and restarted; the receiver fails one
  request in ten with 500 and answers some only after the connector's timeout. Afterwards every
  row change the source made (counted independently by a `test_decoding` slot created before
  the load) was delivered exactly once as a distinct event id, with the same table, op and
  integer column values; redeliveries are the same id with identical content; first
  deliveries come in (commit LSN, position) order; every request was signed with the secret
  read from `${HOOK_SECRET}`; `status --json` shows the connector's backlog 0.
- `test_dead_endpoint_does_not_slow_replication`: with the endpoint answering only 500 the
  sites keep up while the connector's backlog grows and `status --json` shows `last_error`;
  when the endpoint recovers the backlog drains to 0 and every event arrives.

Only PostgreSQL 15: the pgserver build of 16 has no `test_decoding` (and one version keeps the
directory under two minutes).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_sync import commands
from cdc_sync.config import Settings, load_settings
from cdc_sync.connectors import connector_status
from cdc_sync.embedded import Cluster
from tests.integration.helpers import (
    CliProcess,
    assert_same_tables,
    execute,
    run_cli,
    scalar,
    settings_dict,
    wait_for,
    wait_until_caught_up,
)

from .helpers import (
    Receiver,
    analyse,
    audit_changes,
    by_table_op,
    create_audit_slot,
    event_signature,
    pgbench,
    pgbench_path,
    position_key,
    receiving,
    write_hook_config,
)

pytestmark = [
    pytest.mark.parametrize("server_binaries", [15], indirect=True, ids=["pg15"]),
    pytest.mark.timeout(240),
]

SECRET = "s3cr3t-h00k-k3y"
TIMEOUT_SECONDS = 2.0
PRIMARY_KEYS = {"public.pgbench_accounts": "aid", "public.pgbench_branches": "bid",
                "public.pgbench_history": "hid", "public.pgbench_tellers": "tid"}
PGBENCH_TABLES = sorted(PRIMARY_KEYS)
COMMIT_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")


def hook_config(tmp_path: Path, source: str, sites: list[str], url: str,
                **connector: Any) -> tuple[Path, Settings]:
    path = write_hook_config(
        tmp_path / "cdc-sync.toml", settings_dict(source, sites),
        {"name": "hook", "kind": "webhook", "url": url, "secret": "${HOOK_SECRET}",
         "timeout_seconds": TIMEOUT_SECONDS, **connector})
    assert SECRET not in path.read_text()
    return path, load_settings(path)


def cli_ok(*args: str) -> subprocess.CompletedProcess[str]:
    proc = run_cli(*args)
    assert proc.returncode == 0, f"cdc-sync {' '.join(args)}: {proc.stderr}"
    return proc


def status_json(config: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli_ok("status", "-c", str(config), "--json").stdout)
    assert [c["name"] for c in data["connectors"]] == ["hook"], data
    return data


def hook_status(settings: Settings) -> dict[str, Any]:
    (entry,) = connector_status(settings)
    return entry


def stop(proc: CliProcess) -> None:
    code = proc.terminate(60)
    assert code == 0, f"cdc-sync run exited {code}: {proc.stderr()[-3000:]}"


def kill_mid_delivery(proc: CliProcess, receiver: Receiver) -> None:
    """Hold the next acknowledged POST open, SIGKILL the replicator while it waits for the
    answer, release, restart."""
    receiver.hold_next()
    assert receiver.held.wait(30), (f"no delivery to hold (requests {receiver.requests}); "
                                    f"{proc.stderr()[-2000:]}")
    assert proc.alive(), proc.stderr()[-3000:]
    proc.kill()
    receiver.release()
    proc.start()


@pytest.fixture
def hook_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """`${HOOK_SECRET}` for the subprocesses (and `load_settings` here)."""
    monkeypatch.setenv("HOOK_SECRET", SECRET)


@pytest.mark.usefixtures("hook_env")
def test_webhook_delivers_every_change_across_kills(
        cluster: Cluster, make_db: Callable[..., str], tmp_path: Path) -> None:
    program = pgbench_path(cluster.binaries.bindir)
    if program is None:
        pytest.skip("pgbench is not installed")
    source, site = make_db("e2e_src"), make_db("e2e_outbox")
    pgbench(program, source, "-i", "-s", "1", "-q")
    execute(source, "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY")

    with receiving(SECRET, fail_every=10, slow_every=17, slow_offset=6,
                   slow_seconds=TIMEOUT_SECONDS + 1) as receiver:
        config, settings = hook_config(tmp_path, source, [site], receiver.url, batch_size=50)
        cli_ok("init", "-c", str(config))
        try:
            create_audit_slot(source)
        except psycopg.errors.UndefinedFile:
            pytest.skip("this PostgreSQL has no test_decoding")

        proc = CliProcess(config).start()
        try:
            load = subprocess.Popen(
                [str(program), "-c", "2", "-j", "2", "-T", "10", "-R", "60", source],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(3)
                kill_mid_delivery(proc, receiver)
                time.sleep(4)
                kill_mid_delivery(proc, receiver)
                _, err = load.communicate(timeout=60)
                assert load.returncode == 0, f"pgbench failed: {err[-2000:]}"
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait(10)

            wait_until_caught_up(settings, timeout=60)
            expected = audit_changes(source)
            wait_for(lambda: hook_status(settings)["backlog"] == 0, 60,
                     f"the connector's backlog to drain ({proc.stderr()[-2000:]})",
                     interval=0.25)
            data = status_json(config)
            stop(proc)
        finally:
            proc.close()

    assert receiver.problems == []
    assert receiver.requests >= 20, receiver.requests
    assert receiver.failed == receiver.requests // 10 and receiver.slow >= 1
    got = analyse(receiver.snapshot())
    # The held batches were received twice at least: the redelivery was compared.
    assert got.duplicates > 0

    # Every change of the source, no more, no fewer: per table and op, and per row values.
    received = Counter(event_signature(e) for e in got.first.values())
    per_table_op = by_table_op(expected)
    assert by_table_op(received) == per_table_op
    assert {t for t, _ in per_table_op} >= set(PGBENCH_TABLES)
    assert per_table_op[("public.pgbench_history", "insert")] >= 200
    assert per_table_op[("public.pgbench_history", "truncate")] == 1   # pgbench's own
    missing, extra = expected - received, received - expected
    assert not missing and not extra, (
        f"{sum(missing.values())} changes not delivered, e.g. {list(missing)[:3]}; "
        f"{sum(extra.values())} unexpected, e.g. {list(extra)[:3]}")
    history = [e["key"]["hid"] for e in got.first.values()
               if e["topic"] == "public.pgbench_history" and e["op"] == "insert"]
    assert len(set(history)) == len(history)
    # Each transaction whole: positions 0..n-1 under one commit LSN; the event fields.
    positions: dict[str, list[int]] = {}
    for e in got.first.values():
        assert e["source"] == "hq" and COMMIT_TS.fullmatch(e["commit_ts"]), e
        positions.setdefault(e["lsn"], []).append(position_key(e)[1][0])
        if e["op"] in ("insert", "update"):
            assert e["table"] == e["topic"] and e["old"] is None, e
            column = PRIMARY_KEYS[e["topic"]]
            assert e["key"] == {column: e["row"][column]}, e
    for lsn, found in positions.items():
        assert sorted(found) == list(range(len(found))), f"transaction {lsn}: {sorted(found)}"

    (hook,) = data["connectors"]
    assert hook["backlog"] == 0
    assert hook["last_error"] and SECRET not in hook["last_error"]
    assert hook["last_delivery_at"] is not None
    assert_same_tables(source, [site], PGBENCH_TABLES)


@pytest.mark.usefixtures("hook_env")
def test_dead_endpoint_does_not_slow_replication(
        cluster: Cluster, make_db: Callable[..., str], tmp_path: Path) -> None:
    source = make_db("e2e_src")
    sites = [make_db("e2e_outbox"), make_db("e2e_site")]
    execute(source, "CREATE TABLE items (id bigserial PRIMARY KEY, v int NOT NULL)")

    def write(rows: int, transactions: int) -> None:
        for _ in range(transactions):
            execute(source, "INSERT INTO items (v) SELECT g FROM generate_series(1, %s) g",
                    params=(rows,))
        execute(source, "UPDATE items SET v = v + 1 WHERE id % 10 = 0")

    with receiving(SECRET) as receiver:
        receiver.dead.set()
        config, settings = hook_config(tmp_path, source, sites, receiver.url)
        cli_ok("init", "-c", str(config))
        proc = CliProcess(config).start()
        try:
            write(100, 20)                                  # 2000 inserts, 200 updates
            wait_until_caught_up(settings, timeout=30)      # + 1 message event
            first = hook_status(settings)
            assert first["backlog"] == 2000 + 200 + 1, first

            write(100, 10)                                  # 1000 inserts, 300 updates
            written = time.monotonic()
            wait_until_caught_up(settings, timeout=30)
            # The sites keep up (the connector's failures never hold the applier back).
            assert time.monotonic() - written < 15
            assert_same_tables(source, sites, ["public.items"])
            wait_for(lambda: receiver.failed >= 2, 30, "failed deliveries")
            data = status_json(config)
            (hook,) = data["connectors"]
            assert hook["backlog"] == first["backlog"] + 1000 + 300 + 1, hook
            assert hook["delivered_seq"] == 0 and hook["last_delivery_at"] is None, hook
            assert hook["last_error"] and "500" in hook["last_error"], hook
            assert SECRET not in json.dumps(data)
            for entry in data["sites"]:
                assert entry["reachable"] and entry["applied_lsn"] is not None, entry
            assert receiver.snapshot() == []

            receiver.dead.clear()
            wait_for(lambda: hook_status(settings)["backlog"] == 0, 60,
                     "the backlog to drain after the endpoint recovered", interval=0.25)
            stop(proc)
        finally:
            proc.close()

    assert receiver.problems == []
    got = analyse(receiver.snapshot())
    ops = Counter((e["topic"], e["op"]) for e in got.first.values())
    assert ops == {("public.items", "insert"): 3000, ("public.items", "update"): 500,
                   ("cdc_sync_test", "message"): 2}
    assert scalar(source, "SELECT count(*) FROM items") == 3000
    (hook,) = commands.status(settings)["connectors"]
    assert hook["backlog"] == 0 and hook["last_delivery_at"] is not None, hook

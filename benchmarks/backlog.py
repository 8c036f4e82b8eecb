"""(f) Draining a backlog: pgbench wrote while the replicator was not running.

``pgbench -n -c 4 -t N`` (tpcb-like, scale 1, ``pgbench_history`` given a ``hid bigserial``
primary key) runs at the source while the system under test is detached; then it is started
and timed until a marker committed right after pgbench is visible at the site. Each
transaction changes 4 rows, so the backlog is ``16 * N`` changes; rate = changes / seconds.

Three systems in the same run, each with its own site database on the first subscriber
cluster, one at a time:

- cdc-sync with ``[conflicts] strategy = "source_wins"`` (the default);
- cdc-sync with ``strategy = "lww"`` on commit timestamps (no version column);
- native logical replication: the subscription (and its slot) is created before any backlog,
  ``ALTER SUBSCRIPTION … DISABLE`` before pgbench, ``ENABLE`` after, the timing starting at
  ``ENABLE``. For cdc-sync the timing starts when ``cdc-sync run`` is spawned (its start-up is
  part of draining).

And the floor under all of them: ``pg_recvlogical`` reading the same kind of backlog from a
pgoutput slot of the same publication into ``/dev/null`` (``--endpos`` at the marker), which
is the WAL sender's decoding plus a client that does nothing. No pgoutput consumer drains
faster than that; the notes give it as a rate too.

Before each repetition every system is attached once (slot advanced past other systems'
backlogs, a warm-up marker applied) and detached again, as in the other scenarios. The table
shows drain seconds (lower is better): cdc-sync = source_wins; the ratio target ≤ 0.667 is
"source_wins ≥ 1.5 × native's rate". The notes give the three rates and the lww check
(lww ≥ 0.5 × source_wins' rate).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import _pgbench
from benchmarks.harness import (
    MARKER_SITE_DDL,
    MARKER_SOURCE_DDL,
    POLL_INTERVAL,
    BenchError,
    CdcSync,
    Harness,
    NativeReplication,
    Replicator,
    alternate,
    attached,
    connect,
    emit_marker,
    log,
)
from benchmarks.report import Measurement, Scenario, Target

SCALE = 1
CLIENTS = 4
CHANGES_PER_TX = 4  # tpcb-like: 3 updates and 1 insert
TRANSACTIONS = 6250  # per client: 4 * 6250 * 4 = 100k changes
QUICK_TRANSACTIONS = 500  # 8k changes
DRAIN_TIMEOUT = 1200.0
TABLES = (*_pgbench.TABLES, "public.bench_marker")
LWW_MIN = 0.5  # lww rate >= 0.5 x source_wins'
NATIVE_MIN = 1.5  # source_wins rate >= 1.5 x native's

FLOOR_SLOT = "decode_f"
SOURCE_DB = "bench_f"
NATIVE_DB = "native_f1"
SOURCE_WINS_DB = "cdc_f1"
LWW_DB = "cdc_f2"


def _with_strategy(cdc: CdcSync, strategy: str) -> CdcSync:
    """Add ``[conflicts] strategy`` to ``cdc``'s config file."""
    with cdc.config.open("a") as out:
        out.write(f'\n[conflicts]\nstrategy = "{strategy}"\n')
    return cdc


def _setup(harness: Harness) -> tuple[NativeReplication, CdcSync, CdcSync]:
    _pgbench.init_source(harness, SOURCE_DB, SCALE)
    harness.source.execute(MARKER_SOURCE_DDL, dbname=SOURCE_DB)
    # native: the same data as the source up front; cdc-sync: empty tables, init copies
    for db, data in ((NATIVE_DB, True), (SOURCE_WINS_DB, False), (LWW_DB, False)):
        _pgbench.init_site(harness, db, SCALE, data=data)
        harness.site.execute(MARKER_SITE_DDL, dbname=db)
    native = NativeReplication(harness, "native_f", SOURCE_DB, [NATIVE_DB], TABLES)
    native.create()  # disabled subscription; its slot is created now, before any backlog
    source_wins = _with_strategy(
        CdcSync(harness, "cdc_fs", SOURCE_DB, [SOURCE_WINS_DB], TABLES), "source_wins")
    lww = _with_strategy(CdcSync(harness, "cdc_fl", SOURCE_DB, [LWW_DB], TABLES), "lww")
    for cdc in (source_wins, lww):
        log(f"  cdc-sync init ({cdc.name})")
        cdc.init()
    harness.source.execute(  # the decoding floor's slot (publication: cdc_fs's, same tables)
        f"SELECT pg_create_logical_replication_slot('{FLOOR_SLOT}', 'pgoutput')",
        dbname=SOURCE_DB)
    return native, source_wins, lww


def _start_cdc(cdc: CdcSync) -> Callable[[], None]:
    """Start cdc-sync without advancing its slot (the backlog is what it must drain)."""
    cdc.start()
    return cdc.check_alive


def _start_native(native: NativeReplication) -> Callable[[], None]:
    native._alter("ENABLE")
    return lambda: None


def _recvlogical(harness: Harness) -> str:
    for candidate in (harness.source.binaries.program("pg_recvlogical"),
                      Path("/usr/lib/postgresql/15/bin/pg_recvlogical")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("pg_recvlogical")
    if found is None:
        raise BenchError("pg_recvlogical not found next to the server or on PATH")
    return found


def _floor_run(harness: Harness, transactions: int) -> dict[str, Any]:
    """The decoding floor: ``pg_recvlogical`` draining a fresh backlog to ``/dev/null``."""
    harness.quiesce(SOURCE_DB, [])
    harness.advance_slot(SOURCE_DB, FLOOR_SLOT)
    harness.pgbench(SOURCE_DB, "-n", "-c", str(CLIENTS), "-t", str(transactions),
                    timeout=DRAIN_TIMEOUT)
    with connect(harness.source.dsn(SOURCE_DB)) as source:
        emit_marker(source)
        row = source.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
    harness.source.execute("CHECKPOINT")
    src = harness.source
    cmd = [_recvlogical(harness), "-h", src.host, "-p", str(src.port), "-U", "postgres",
           "-d", SOURCE_DB, "--slot", FLOOR_SLOT, "--start", "--no-loop", "-E", row[0],
           "-o", "proto_version=1", "-o", "publication_names=cdc_fs", "-f", "/dev/null"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DRAIN_TIMEOUT, env=env,
                          check=False)
    seconds = time.monotonic() - began
    if proc.returncode != 0:
        raise BenchError(f"pg_recvlogical failed: {proc.stderr.strip()[-300:]}")
    changes = CLIENTS * transactions * CHANGES_PER_TX
    return {"seconds": seconds, "changes": changes, "rate": changes / seconds}


def _one_run(harness: Harness, system: Replicator, start: Callable[[], Callable[[], None]],
             transactions: int) -> dict[str, Any]:
    """Warm ``system`` up and detach it, run pgbench, start it: the drain's figures."""
    harness.quiesce(SOURCE_DB, system.site_dbs)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(connect(harness.source.dsn(SOURCE_DB)))
        site = stack.enter_context(connect(harness.site_dsn(system.site_dbs[0])))
        with attached(system, source, [site]):
            pass  # slot past the other systems' backlogs, warm-up marker applied; detached
        output = harness.pgbench(SOURCE_DB, "-n", "-c", str(CLIENTS),
                                 "-t", str(transactions), timeout=DRAIN_TIMEOUT)
        marker = emit_marker(source)
        harness.source.execute("CHECKPOINT")
        try:
            began = time.monotonic()
            alive = start()
            while True:
                alive()
                row = site.execute("SELECT EXISTS (SELECT 1 FROM bench_marker WHERE id = %s)",
                                   (marker,)).fetchone()
                end = time.monotonic()
                if row == (True,):
                    break
                if end - began > DRAIN_TIMEOUT:
                    raise BenchError(f"timed out after {DRAIN_TIMEOUT:g} s waiting for "
                                     f"{system.label} to drain")
                time.sleep(POLL_INTERVAL)
        finally:
            system.detach()
    seconds = end - began
    changes = CLIENTS * transactions * CHANGES_PER_TX
    return {"seconds": seconds, "changes": changes, "rate": changes / seconds,
            "pgbench_tps": _pgbench.parse_tps(output)}


def run(harness: Harness, repetitions: int, transactions: int) -> Measurement:
    native, source_wins, lww = _setup(harness)
    source_wins.label = "cdc-sync source_wins"
    lww.label = "cdc-sync lww"
    runs = alternate(repetitions, {
        "native": lambda: _one_run(harness, native, lambda: _start_native(native),
                                   transactions),
        "source_wins": lambda: _one_run(harness, source_wins,
                                        lambda: _start_cdc(source_wins), transactions),
        "lww": lambda: _one_run(harness, lww, lambda: _start_cdc(lww), transactions),
        "floor": lambda: _floor_run(harness, transactions),
    })
    rates = {label: statistics.median(r["rate"] for r in rs) for label, rs in runs.items()}
    lww_ratio = rates["lww"] / rates["source_wins"]
    native_ratio = rates["source_wins"] / rates["native"]
    verdict = {True: "ok", False: "MISSED"}
    details: dict[str, Any] = {
        "runs": runs,
        "transactions_per_client": transactions,
        "changes": CLIENTS * transactions * CHANGES_PER_TX,
        "rates": rates,
        "lww_over_source_wins": lww_ratio,
        "source_wins_over_native": native_ratio,
        "lww_seconds": statistics.median(r["seconds"] for r in runs["lww"]),
    }
    details["summary"] = (
        f"{details['changes']} changes; rates (changes/s): source_wins "
        f"{rates['source_wins']:.0f}, lww {rates['lww']:.0f}, native {rates['native']:.0f}; "
        f"lww/source_wins {lww_ratio:.2f} (target ≥ {LWW_MIN:g}: "
        f"{verdict[lww_ratio >= LWW_MIN]}), source_wins/native {native_ratio:.2f} "
        f"(target ≥ {NATIVE_MIN:g}: {verdict[native_ratio >= NATIVE_MIN]}); decoding floor "
        f"(pg_recvlogical to /dev/null) {rates['floor']:.0f}, i.e. {rates['floor'] / rates['native']:.2f} "
        f"× native's rate")
    return Measurement(cdc_sync=[r["seconds"] for r in runs["source_wins"]],
                       native=[r["seconds"] for r in runs["native"]], details=details)


def _run(harness: Harness, repetitions: int) -> Measurement:
    return run(harness, repetitions, TRANSACTIONS)


def _run_quick(harness: Harness, repetitions: int) -> Measurement:
    return run(harness, repetitions, QUICK_TRANSACTIONS)


def scenario(quick: bool = False) -> Scenario:
    """(f) with the full or the ``--quick`` backlog."""
    transactions = QUICK_TRANSACTIONS if quick else TRANSACTIONS
    return Scenario(
        key="f",
        title=f"backlog drain, {CLIENTS * transactions * CHANGES_PER_TX // 1000}k changes → 1 site",
        metric="drain time (source_wins)",
        unit="s",
        target=Target("ratio", round(1 / NATIVE_MIN, 3)),
        run=_run_quick if quick else _run,
    )


SCENARIO = scenario()

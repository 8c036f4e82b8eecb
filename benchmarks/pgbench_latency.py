"""(c) Replication latency under a steady pgbench load.

pgbench's tpcb-like script runs at a fixed 300 transactions/s on the source (scale 1,
``-R 300 -T 20 -c 4 -j 2``) while a probe writer inserts one row every 20 ms into
``probe(id, src_ts default clock_timestamp(), dst_ts)``. On each site a ``BEFORE INSERT``
trigger, ``ENABLE ALWAYS`` so that it fires under ``session_replication_role = replica`` (as
both native apply and cdc-sync run), stamps ``dst_ts = clock_timestamp()``. Both clusters run on
this machine, so the clocks agree: ``dst_ts - src_ts`` is the probe's latency. Reported: p99 (and
p50) per system, median over repetitions. Target: cdc-sync p99 ≤ 10 ms.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import _pgbench
from benchmarks.harness import (
    MARKER_SITE_DDL,
    MARKER_SOURCE_DDL,
    BenchError,
    CdcSync,
    Harness,
    NativeReplication,
    Replicator,
    alternate,
    attached,
    connect,
    log,
    wait_for,
)
from benchmarks.report import Measurement, Scenario, Target

SCALE = 1
RATE = 300
DURATION = 20
CLIENTS = 4
THREADS = 2
PROBE_INTERVAL = 0.02
TABLES = (*_pgbench.TABLES, "public.probe", "public.bench_marker")

PROBE_DDL = ("CREATE TABLE probe (id bigserial PRIMARY KEY, "
             "src_ts timestamptz NOT NULL DEFAULT clock_timestamp(), dst_ts timestamptz)")
PROBE_SITE_DDL = (
    PROBE_DDL,
    "CREATE FUNCTION probe_stamp() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN NEW.dst_ts := clock_timestamp(); RETURN NEW; END$$",
    "CREATE TRIGGER probe_stamp BEFORE INSERT ON probe FOR EACH ROW "
    "EXECUTE FUNCTION probe_stamp()",
    "ALTER TABLE probe ENABLE ALWAYS TRIGGER probe_stamp",
)


class ProbeWriter(threading.Thread):
    """Inserts one probe row every ``interval`` seconds (on a fixed schedule) until stopped."""

    def __init__(self, dsn: str, interval: float = PROBE_INTERVAL) -> None:
        super().__init__(name="probe-writer", daemon=True)
        self.dsn = dsn
        self.interval = interval
        self.first: int | None = None
        self.last: int | None = None
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.dsn) as conn:
                due = time.monotonic()
                while not self._halt.is_set():
                    row = conn.execute("INSERT INTO probe DEFAULT VALUES RETURNING id").fetchone()
                    assert row is not None
                    self.first = self.first if self.first is not None else int(row[0])
                    self.last = int(row[0])
                    due += self.interval
                    delay = due - time.monotonic()
                    if delay > 0:
                        self._halt.wait(delay)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> tuple[int, int]:
        """Stop writing; the first and last probe ids written."""
        self._halt.set()
        self.join()
        if self.error is not None:
            raise BenchError(f"probe writer failed: {self.error}")
        if self.first is None or self.last is None:
            raise BenchError("probe writer wrote nothing")
        return self.first, self.last


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, interpolated linearly between ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _setup(harness: Harness) -> tuple[str, NativeReplication, CdcSync]:
    source_db = "bench_c"
    _pgbench.init_source(harness, source_db, SCALE)
    for statement in (PROBE_DDL, MARKER_SOURCE_DDL):
        harness.source.execute(statement, dbname=source_db)
    # native: the same data as the source up front; cdc-sync: empty tables, init copies
    for db, data in (("native_c1", True), ("cdc_c1", False)):
        _pgbench.init_site(harness, db, SCALE, data=data)
        for statement in (*PROBE_SITE_DDL, MARKER_SITE_DDL):
            harness.site.execute(statement, dbname=db)
    native = NativeReplication(harness, "native_c", source_db, ["native_c1"], TABLES)
    native.create()
    cdc = CdcSync(harness, "cdc_c", source_db, ["cdc_c1"], TABLES)
    log("  cdc-sync init")
    cdc.init()
    return source_db, native, cdc


def _one_run(harness: Harness, system: Replicator, source_db: str) -> dict[str, Any]:
    """One pgbench run with the probe while ``system`` is attached; its latency figures."""
    harness.quiesce(source_db, system.site_dbs)
    source_dsn = harness.source.dsn(source_db)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(connect(source_dsn))
        site = stack.enter_context(connect(harness.site.dsn(system.site_dbs[0])))
        stack.enter_context(attached(system, source, [site]))
        writer = ProbeWriter(source_dsn)
        writer.start()
        try:
            output = harness.pgbench(
                source_db, "-n", "-R", str(RATE), "-T", str(DURATION), "-c", str(CLIENTS),
                "-j", str(THREADS), timeout=DURATION + 300)
        finally:
            first, last = writer.stop()

        def arrived() -> bool:
            row = site.execute("SELECT count(*) FROM probe WHERE id BETWEEN %s AND %s",
                               (first, last)).fetchone()
            return row is not None and row[0] == last - first + 1

        wait_for(arrived, timeout=300, what=f"{system.label} to apply every probe row")
        latencies = [float(ms) for (ms,) in site.execute(
            "SELECT extract(epoch FROM dst_ts - src_ts) * 1000 FROM probe "
            "WHERE id BETWEEN %s AND %s", (first, last)).fetchall()]
    return {
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "probes": len(latencies),
        "tps": _pgbench.parse_tps(output),
    }


def run(harness: Harness, repetitions: int) -> Measurement:
    source_db, native, cdc = _setup(harness)
    runs = alternate(repetitions, {
        "native": lambda: _one_run(harness, native, source_db),
        "cdc-sync": lambda: _one_run(harness, cdc, source_db),
    })
    details: dict[str, Any] = {"runs": runs}
    for label, key in (("native", "native"), ("cdc-sync", "cdc_sync")):
        details[f"{key}_p50_ms"] = statistics.median(r["p50"] for r in runs[label])
        details[f"{key}_max_ms"] = max(r["max"] for r in runs[label])
    details["summary"] = (
        f"p50 cdc-sync {details['cdc_sync_p50_ms']:.1f} ms, native "
        f"{details['native_p50_ms']:.1f} ms; worst probe cdc-sync "
        f"{details['cdc_sync_max_ms']:.1f} ms, native {details['native_max_ms']:.1f} ms")
    return Measurement(cdc_sync=[r["p99"] for r in runs["cdc-sync"]],
                       native=[r["p99"] for r in runs["native"]], details=details)


SCENARIO = Scenario(
    key="c",
    title=f"pgbench {RATE} tps + probe → 1 site",
    metric="probe latency p99",
    unit="ms",
    target=Target("cdc_sync", 10.0),
    run=run,
)

"""(e) Peak memory of ``cdc-sync run`` while it applies one 1,000,000-row UPDATE transaction.

A fresh ``cdc-sync run`` process per repetition; after the site has applied the transaction
(and a marker committed after it), its peak resident set size (``VmHWM`` in
``/proc/PID/status``) is read. Native replication has no comparable process figure (its apply
worker is a server backend): n/a. Target: cdc-sync ≤ 300 MB.
"""

from __future__ import annotations

import contextlib
import statistics
import time

from benchmarks._update import setup, update_all
from benchmarks.harness import Harness, alternate, attached, connect, emit_marker, wait_marker
from benchmarks.report import Measurement, Scenario, Target

ROWS = 1_000_000


def run(harness: Harness, repetitions: int) -> Measurement:
    s = setup(harness, "e", rows=ROWS, sites=1, native=False)
    cdc = s.cdc

    def once() -> dict[str, float]:
        harness.quiesce(s.source_db, cdc.site_dbs)
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(connect(harness.source.dsn(s.source_db)))
            site = stack.enter_context(connect(harness.site.dsn(cdc.site_dbs[0])))
            stack.enter_context(attached(cdc, source, [site]))
            idle = cdc.memory_mb("VmRSS")
            update_all(source)
            start = time.monotonic()
            end = wait_marker([site], emit_marker(source), timeout=1800,
                              what="cdc-sync to apply the 1M-row update")
            return {"peak_mb": cdc.memory_mb("VmHWM"), "idle_mb": idle,
                    "apply_s": end - start}

    runs = alternate(repetitions, {"cdc-sync": once})["cdc-sync"]
    idle = statistics.median(r["idle_mb"] for r in runs)
    apply_s = statistics.median(r["apply_s"] for r in runs)
    return Measurement(
        cdc_sync=[r["peak_mb"] for r in runs], native=None,
        details={"rows": ROWS, "runs": runs,
                 "summary": f"RSS before the update {idle:.0f} MB; the 1M-row update applied "
                            f"in {apply_s:.1f} s ({ROWS / apply_s:,.0f} rows/s)"})


SCENARIO = Scenario(
    key="e",
    title="1M-row UPDATE, cdc-sync run memory",
    metric="peak RSS (VmHWM)",
    unit="MB",
    target=Target("cdc_sync", 300.0),
    run=run,
)

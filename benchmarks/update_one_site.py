"""(a) One 300,000-row UPDATE transaction replicated to one site.

Measures the seconds from the source COMMIT until the site has applied it (a marker row
committed right after it is visible there), for a native subscription (``copy_data = false``,
``streaming`` off) and for ``cdc-sync run`` with one site. Target: cdc-sync / native ≤ 0.9.
"""

from __future__ import annotations

from benchmarks._update import measure_fanout
from benchmarks.harness import Harness
from benchmarks.report import Measurement, Scenario, Target

ROWS = 300_000


def run(harness: Harness, repetitions: int) -> Measurement:
    return measure_fanout(harness, "a", rows=ROWS, sites=1, repetitions=repetitions)


SCENARIO = Scenario(
    key="a",
    title="300k-row UPDATE → 1 site",
    metric="commit → applied",
    unit="s",
    target=Target("ratio", 0.9),
    run=run,
)

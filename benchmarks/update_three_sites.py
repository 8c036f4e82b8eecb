"""(b) One 300,000-row UPDATE transaction replicated to three sites.

Native replication needs three subscriptions, each with its own slot (the source decodes the
transaction three times); cdc-sync decodes it once and applies it to its three sites. Measures
the seconds from the source COMMIT until *all* sites have applied it. Target: ratio ≤ 0.5.
"""

from __future__ import annotations

from benchmarks._update import measure_fanout
from benchmarks.harness import Harness
from benchmarks.report import Measurement, Scenario, Target

ROWS = 300_000


def run(harness: Harness, repetitions: int) -> Measurement:
    return measure_fanout(harness, "b", rows=ROWS, sites=3, repetitions=repetitions)


SCENARIO = Scenario(
    key="b",
    title="300k-row UPDATE → 3 sites",
    metric="commit → all applied",
    unit="s",
    target=Target("ratio", 0.5),
    run=run,
)

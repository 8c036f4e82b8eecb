"""(b) One 300,000-row UPDATE transaction replicated to three sites.

Native replication needs three subscriptions, each with its own slot (the source decodes the
transaction three times); cdc-sync decodes it once and applies it to its three sites. Measures
the seconds from the source COMMIT until *all* sites have applied it. Target: ratio ≤ 0.5.
"""

from __future__ import annotations

from benchmarks._update import fanout_scenario

SCENARIO = fanout_scenario("b", sites=3, ratio=0.5)

"""(a) One 300,000-row UPDATE transaction replicated to one site.

Measures the seconds from the source COMMIT until the site has applied it (a marker row
committed right after it is visible there), for a native subscription (``copy_data = false``,
``streaming`` off) and for ``cdc-sync run`` with one site. Target: cdc-sync / native ≤ 0.9.
"""

from __future__ import annotations

from benchmarks._update import fanout_scenario

SCENARIO = fanout_scenario("a", sites=1, ratio=0.9)

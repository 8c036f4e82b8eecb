"""Counter columns merged as deltas.

`[conflicts.tables."public.budgets"] counters = ["spent"]` (REPLICA IDENTITY FULL on every
office so old values are sent): an incoming `spent = spent + 5` adds 5 to whatever the site
holds, so concurrent increments at two offices all survive.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

from cdc_sync.embedded import ServerBinaries
from tests.integration.helpers import connect

from .helpers import BUDGETS_DDL, COUNTERS, Office, mesh, spent

A, B = "berlin", "washington"

KEYS = 3
INCREMENTS = 150  # per office
STEP = 5

MakeOffices = Callable[..., list[Office]]


def test_concurrent_increments_all_survive(offices: MakeOffices,
                                           server_binaries: ServerBinaries) -> None:
    """Two offices run `spent = spent + 5` on the same few rows at the same time, while
    replicating both ways: afterwards every office holds 5 x (all increments of both)."""
    made = offices([A, B], BUDGETS_DDL)
    with mesh(made, conflicts=COUNTERS) as m:
        for i in range(1, KEYS + 1):
            m.office(A).execute("INSERT INTO budgets (id, office) VALUES (%s, 'seed')", (i,))
        m.wait_same("budgets")
        counts: dict[str, Counter[int]] = {}
        errors: list[BaseException] = []

        def writer(o: Office) -> None:
            rng = random.Random(o.name)
            done: Counter[int] = Counter()
            try:
                with connect(o.dsn) as conn:
                    for _ in range(INCREMENTS):
                        k = rng.randint(1, KEYS)
                        conn.execute("UPDATE budgets SET spent = spent + %s, office = %s "
                                     "WHERE id = %s", (STEP, o.name, k))
                        done[k] += 1
                        time.sleep(rng.uniform(0, 0.008))
            except BaseException as exc:
                errors.append(exc)
            counts[o.name] = done

        threads = [threading.Thread(target=writer, args=(o,)) for o in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        total = counts[A] + counts[B]
        expected = {i: f"{STEP * total[i]:.2f}" for i in range(1, KEYS + 1)}
        m.caught_up()
        views = {o.name: spent(o) for o in made}
        assert views == {A: expected, B: expected}, f"increments lost: {total}"

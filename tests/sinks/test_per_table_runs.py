"""The resolving path's runs without planning: `_per_table_runs(changes)` equals
`SiteWriter._merge_resolving(plan_runs(changes))` when every table resolves and the site runs
as `session_replication_role = replica` (randomised, seeded; the seed is in every failure)."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from cdc_sync.changes import Change, Op, Table
from cdc_sync.protocol import ReplicaIdentity
from cdc_sync.sinks._plan import plan_runs
from cdc_sync.sinks.site import SiteWriter, _per_table_runs

TABLES = [Table(n, "public", f"t{n}", ("id", "v"), (23, 25), (-1, -1), (0,),
                ReplicaIdentity.DEFAULT) for n in (1, 2, 3)]
KEYS = {t.oid: (0,) for t in TABLES}


def _random_changes(rng: random.Random, n: int) -> list[Change]:
    out: list[Change] = []
    for pos in range(n):
        r = rng.random()
        if r < 0.03:
            out.append(Change(Op.TRUNCATE, pos, None, truncated=(rng.choice(TABLES),)))
            continue
        table = rng.choice(TABLES)
        key = str(rng.randrange(6))
        if r < 0.4:
            out.append(Change(Op.INSERT, pos, table, new=(key, str(pos))))
        elif r < 0.8:
            out.append(Change(Op.UPDATE, pos, table, new=(key, str(pos))))
        else:
            out.append(Change(Op.DELETE, pos, table, old=(key, None), old_is_key=True))
    return out


def _shape(runs: Any) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(r.op.value if r.table is None else "rows", r.table.name if r.table else "-",
             tuple(c.position for c in r.changes)) for r in runs]


@pytest.mark.parametrize("seed", range(20))
def test_per_table_runs_equal_merged_planned_runs(seed: int) -> None:
    rng = random.Random(seed)
    changes = _random_changes(rng, rng.randrange(1, 200))
    fake = SimpleNamespace(_site_table_or_none=lambda t: t, _resolver=lambda st: object(),
                           _replica_role=True)
    merged = SiteWriter._merge_resolving(fake, list(plan_runs(changes, KEYS)))  # type: ignore[arg-type]
    assert _shape(_per_table_runs(changes)) == _shape(merged), f"seed {seed}"


def test_truncates_split_the_stretches() -> None:
    t1, t2 = TABLES[0], TABLES[1]
    changes = [Change(Op.INSERT, 0, t1, new=("1", "a")), Change(Op.INSERT, 1, t2, new=("1", "a")),
               Change(Op.UPDATE, 2, t1, new=("1", "b")),
               Change(Op.TRUNCATE, 3, None, truncated=(t2,)),
               Change(Op.INSERT, 4, t1, new=("2", "a"))]
    assert _shape(_per_table_runs(changes)) == [
        ("rows", "t1", (0, 2)), ("rows", "t2", (1,)), ("truncate", "-", (3,)), ("rows", "t1", (4,))]

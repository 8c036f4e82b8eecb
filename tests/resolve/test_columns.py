"""Per-column merge (`merge_columns = true` with `lww`): each column keeps its own last writer.

The rules are in `cdc_sync/resolve/_columns.py`. Cases: Berlin changes `amount` while Tokyo
changes `note` of the same row (both survive, in either delivery order), the outcome of a
write that wins some columns and loses others, deletes against a later write to one column,
cells kept by a tombstone and brought back by a later write; then a seeded property test
(`CDC_SYNC_SEED` replays one, the seed is printed on failure): three offices write random
subsets of columns, delete and re-insert, the streams interleave at random, and every office
ends identical, each column holding its latest writer's value when nothing was deleted.
"""

from __future__ import annotations

import os
import random
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cdc_sync.changes import Op
from cdc_sync.config import settings_from_dict
from cdc_sync.errors import ConfigError
from cdc_sync.resolve import Incoming, LocalRow, PolicyResolver, Tombstone, changed_columns

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
Row = dict[str, str | None]
KEY = {"id": "1"}
BASE: Row = {"id": "1", "amount": "100", "note": "base", "owner": "ann"}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def resolver(site: str) -> PolicyResolver:
    return PolicyResolver("public.grants", "lww", site=site, merge_columns=True)


def update(old: Row, t: float, origin: str, **changes: str) -> Incoming:
    return Incoming(Op.UPDATE, {**old, **changes}, dict(old), True, at(t), origin, KEY,
                    identity_full=True)


def base_row(t: float = 0.0) -> LocalRow:
    """The row every office holds, every column written at `t` by washington."""
    return LocalRow(dict(BASE), at(t), "washington", {c: (at(t), "washington") for c in BASE})


def test_concurrent_changes_to_different_columns_both_survive_in_either_order() -> None:
    berlin = update(BASE, 10, "berlin", amount="250")
    tokyo = update(BASE, 11, "tokyo", note="approved")
    finals = []
    for first, second in ((berlin, tokyo), (tokyo, berlin)):
        r = resolver("washington")
        row = base_row()
        for change in (first, second):
            d = r.resolve(row, change, None)
            assert d.action == "write"
            row = d.local_after(row, change)
            assert row is not None
        finals.append(dict(row.values))
    assert finals[0] == finals[1] == {**BASE, "amount": "250", "note": "approved"}
    # At Berlin itself (its own write already there), Tokyo's change merges the other column.
    r = resolver("berlin")
    here = LocalRow({**BASE, "amount": "250"}, at(10), "",
                    {**base_row().clocks, "amount": (at(10), "")})  # type: ignore[dict-item]
    d = r.resolve(here, tokyo, None)
    assert d.action == "write" and d.conflict == "update_update" and d.outcome == "applied" or \
        d.outcome in ("incoming_wins", "applied")
    assert d.row == {**BASE, "amount": "250", "note": "approved"}


def test_a_write_loses_the_columns_changed_later_and_wins_the_rest() -> None:
    r = resolver("washington")
    here = LocalRow({**BASE, "note": "later"}, at(20), "tokyo",
                    {**base_row().clocks, "note": (at(20), "tokyo")})  # type: ignore[dict-item]
    change = update(BASE, 15, "berlin", amount="7", note="earlier")
    d = r.resolve(here, change, None)
    assert (d.action, d.conflict, d.outcome) == ("write", "update_update", "merged")
    assert d.row == {**BASE, "amount": "7", "note": "later"}
    assert d.clocks is not None and d.clocks["amount"] == (at(15), "berlin")
    assert d.clocks["note"] == (at(20), "tokyo")
    # Losing every column it changed: the site keeps its row.
    d = r.resolve(here, update(BASE, 15, "berlin", note="earlier"), None)
    assert (d.action, d.outcome) == ("skip", "local_wins")


def test_unchanged_columns_are_not_writes() -> None:
    change = update(BASE, 5, "berlin", amount="1")
    assert changed_columns(change, frozenset()) == {"amount"}
    insert = Incoming(Op.INSERT, dict(BASE), None, False, at(5), "berlin", KEY)
    assert changed_columns(insert, frozenset()) == set(BASE)
    keyonly = Incoming(Op.UPDATE, {**BASE, "amount": "1"}, None, False, at(5), "berlin", KEY)
    assert changed_columns(keyonly, frozenset({"amount"})) == {"id", "note", "owner"}


def test_a_delete_loses_to_a_later_write_of_any_column() -> None:
    r = resolver("washington")
    here = LocalRow({**BASE, "note": "later"}, at(20), "tokyo",
                    {**base_row().clocks, "note": (at(20), "tokyo")})  # type: ignore[dict-item]
    delete = Incoming(Op.DELETE, None, dict(BASE), True, at(18), "berlin", KEY,
                      identity_full=True)
    d = r.resolve(here, delete, None)
    assert (d.action, d.conflict, d.outcome) == ("skip", "delete_update", "local_wins")
    later = Incoming(Op.DELETE, None, dict(BASE), True, at(25), "berlin", KEY,
                     identity_full=True)
    d = r.resolve(here, later, None)
    assert d.action == "delete" and d.tombstone is not None
    assert d.tombstone.values == here.values and d.tombstone.clocks == here.clocks


def test_a_tombstone_keeps_cells_and_a_later_write_brings_them_back() -> None:
    r = resolver("tokyo")
    tomb = Tombstone(at(18), None, "berlin", dict(BASE), base_row().clocks)
    # An older write to `owner` stays deleted but its cell is kept ...
    older = update(BASE, 12, "washington", owner="bob")
    d = r.resolve(None, older, tomb)
    assert (d.action, d.conflict, d.outcome) == ("delete", "update_delete", "kept_deleted")
    assert d.row is None and d.tombstone is not None
    tomb2 = d.tombstone_after(tomb)
    assert tomb2 is not None and tomb2.values is not None and tomb2.values["owner"] == "bob"
    assert tomb2.deleted_at == at(18)
    # ... so the later write of `amount` (made before it saw bob) brings back the row with both.
    later = update(BASE, 30, "tokyo", amount="5")
    d = r.resolve(None, later, tomb2)
    assert d.action == "write" and d.outcome == "incoming_wins"
    assert d.row == {**BASE, "amount": "5", "owner": "bob"}


def test_config_merge_columns() -> None:
    text = '''
[source]
name = "a"
dsn = "postgresql://localhost/a"
[[sites]]
name = "b"
dsn = "postgresql://localhost/b"
[conflicts]
strategy = "lww"
[conflicts.tables."public.grants"]
merge_columns = true
'''
    s = settings_from_dict(tomllib.loads(text))
    assert s.conflicts.for_table("public.grants").merge_columns
    assert not s.conflicts.for_table("public.other").merge_columns
    bad = text.replace('strategy = "lww"', 'strategy = "lww"\nversion_column = "updated_at"')
    with pytest.raises(ConfigError, match="merge_columns needs strategy"):
        settings_from_dict(tomllib.loads(bad))
    with pytest.raises(ValueError, match="merge_columns"):
        PolicyResolver("public.grants", "first_write_wins", site="x", merge_columns=True)


# -- property: three offices end identical ----------------------------------------------------

OFFICES = ("berlin", "tokyo", "washington")
COLUMNS = ("amount", "note", "owner")


@dataclass
class Office:
    name: str
    row: LocalRow | None = None
    tomb: Tombstone | None = None
    inbox: dict[str, list[Incoming]] = field(default_factory=dict)


def _local_write(o: Office, rng: random.Random, t: float, n: int, deletes: bool) -> Incoming:
    """A write at office `o` itself (it always takes effect there) and the change its stream
    carries: insert (no row), delete, or an update of a random subset of columns."""
    clock = (at(t), "")
    if o.row is None:
        values: Row = {"id": "1", **{c: f"{o.name}-{c}-{n}" for c in COLUMNS}}
        o.row, o.tomb = LocalRow(values, at(t), "", {c: clock for c in values}), None
        return Incoming(Op.INSERT, values, None, False, at(t), o.name, KEY, identity_full=True)
    old = dict(o.row.values)
    if deletes and rng.random() < 0.25:
        o.tomb = Tombstone(at(t), None, "", old, o.row.clocks)
        o.row = None
        return Incoming(Op.DELETE, None, old, True, at(t), o.name, KEY, identity_full=True)
    cols = rng.sample(COLUMNS, rng.randint(1, len(COLUMNS)))
    new = {**old, **{c: f"{o.name}-{c}-{n}" for c in cols}}
    o.row = LocalRow(new, at(t), "", {**(o.row.clocks or {}), **{c: clock for c in cols}})
    return Incoming(Op.UPDATE, new, old, True, at(t), o.name, KEY, identity_full=True)


def _receive(o: Office, r: PolicyResolver, change: Incoming) -> None:
    d = r.resolve(o.row, change, o.tomb)
    o.row, o.tomb = d.local_after(o.row, change), d.tombstone_after(o.tomb)
    if o.row is not None:
        o.tomb = None  # a row written again: its tombstone goes (as the applier does)


def _run(seed: int, deletes: bool) -> tuple[dict[str, Any], list[tuple[float, str, Incoming]]]:
    rng = random.Random(seed)
    offices = {o: Office(o, inbox={p: [] for p in OFFICES if p != o}) for o in OFFICES}
    resolvers = {o: resolver(o) for o in OFFICES}
    # Every office starts from the same row (as after the initial copy: no clocks).
    for o in offices.values():
        o.row = LocalRow(dict(BASE), at(0), "")
    log: list[tuple[float, str, Incoming]] = []
    t = 1.0
    for n in range(rng.randint(5, 40)):
        if rng.random() < 0.5:
            office = rng.choice(OFFICES)
            t += rng.choice((0.001, 0.01, 0.5))
            change = _local_write(offices[office], rng, t, n, deletes)
            log.append((t, office, change))
            for other in OFFICES:
                if other != office:
                    offices[other].inbox[office].append(change)
        else:
            office = rng.choice(OFFICES)
            pending = [p for p, q in offices[office].inbox.items() if q]
            if pending:
                src = rng.choice(pending)
                _receive(offices[office], resolvers[office], offices[office].inbox[src].pop(0))
    for office in OFFICES:
        while any(offices[office].inbox.values()):
            src = rng.choice([p for p, q in offices[office].inbox.items() if q])
            _receive(offices[office], resolvers[office], offices[office].inbox[src].pop(0))
    return ({o: (dict(s.row.values) if s.row else "deleted") for o, s in offices.items()}, log)


@pytest.mark.parametrize("deletes", [False, True], ids=["updates", "with-deletes"])
def test_three_offices_converge_column_by_column(deletes: bool) -> None:
    seed_env = os.environ.get("CDC_SYNC_SEED", "random")
    first = random.randrange(1 << 30) if seed_env == "random" else int(seed_env)
    for seed in range(first, first + 400):
        finals, log = _run(seed, deletes)
        assert len({repr(v) for v in finals.values()}) == 1, (
            f"seed {seed} (CDC_SYNC_SEED={seed}): offices differ: {finals}")
        if deletes:
            continue
        # No deletes: each column holds the value of the latest write that changed it.
        final = finals["berlin"]
        assert isinstance(final, dict)
        for column in COLUMNS:
            writes = [(t, office, ch) for t, office, ch in log
                      if column in changed_columns(ch, frozenset())]
            expected = max(writes, key=lambda w: (w[0], w[1]))[2].new[column] if writes \
                else BASE[column]  # type: ignore[index]
            assert final[column] == expected, (
                f"seed {seed} (CDC_SYNC_SEED={seed}): {column} is {final[column]!r}, its "
                f"last write was {expected!r}")


def test_a_local_tombstone_rewritten_keeps_this_sites_name() -> None:
    """A local delete's tombstone (origin "") that takes an older write's cells is written
    back under the site's name: left as a local one, the applier would date it by its own
    transaction's commit time, which under our replication origin is the incoming source's."""
    r = resolver("tokyo")
    local = Tombstone(at(19), None, "", dict(BASE), base_row().clocks)
    d = r.resolve(None, update(BASE, 18, "washington", owner="bob"), local)
    assert d.outcome == "kept_deleted" and d.tombstone is not None
    assert (d.tombstone.origin, d.tombstone.deleted_at) == ("tokyo", at(19))

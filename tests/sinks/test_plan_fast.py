"""`plan_runs`'s single-run fast path (`_single_run`) against the general planner on random
chunks: the same runs always, and the fast path taken exactly for chunks that are one op on
one keyed table with distinct keys and whole rows (no TOAST placeholders, no old keys)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from cdc_sync.changes import UNCHANGED_TOAST, Change, Op, Table
from cdc_sync.protocol import ReplicaIdentity, Value
from cdc_sync.sinks import _plan
from cdc_sync.sinks._plan import Run, plan_runs

T = Table(1, "public", "t", ("id", "v", "big"), (23, 25, 25), (-1, -1, -1), (0,),
          ReplicaIdentity.DEFAULT)
U = Table(2, "public", "u", ("a", "b", "v", "w"), (23, 23, 25, 25), (-1,) * 4, (0, 1),
          ReplicaIdentity.DEFAULT)
NOKEY = Table(3, "public", "nokey", ("x", "y"), (25, 25), (-1, -1), (), ReplicaIdentity.FULL)
KEYS = {1: (0,), 2: (0, 1)}
TABLES = [T, T, U, U, NOKEY]


def general_runs(changes: list[Change], compact: frozenset[int],
                 monkeypatch: pytest.MonkeyPatch) -> list[Run]:
    """plan_runs with the fast path unreachable."""
    with monkeypatch.context() as m:
        m.setattr(_plan, "_single_run", lambda *args: None)
        return list(plan_runs(changes, KEYS, compact=compact))


def key_of(table: Table, row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(row[i] for i in KEYS[table.oid])


def fast_expected(changes: list[Change]) -> bool:
    """Homogeneous (one op, one keyed table, rows only), distinct keys, whole rows."""
    first = changes[0]
    table, op = first.table, first.op
    if table is None or table.oid not in KEYS or op not in (Op.INSERT, Op.UPDATE, Op.DELETE):
        return False
    if any(c.op is not op or c.table is not table for c in changes):
        return False
    if op is Op.UPDATE and any(c.old is not None or UNCHANGED_TOAST in (c.new or ())
                               for c in changes):
        return False
    rows = [c.old if op is Op.DELETE else c.new for c in changes]
    keys = [key_of(table, r) for r in rows if r is not None]
    return len(set(keys)) == len(keys)


def row(table: Table, key: tuple[int, ...], rng: random.Random, *, toast: bool) -> tuple[Value, ...]:
    values: list[Value] = []
    keycols = KEYS.get(table.oid, ())
    for i in range(len(table.columns)):
        if i in keycols:
            values.append(str(key[keycols.index(i)]))
        elif toast and rng.random() < 0.5:
            values.append(UNCHANGED_TOAST)
        else:
            values.append(rng.choice(["a", "b", None, ""]))
    return tuple(values)


def key_row(table: Table, key: tuple[int, ...]) -> tuple[Value, ...]:
    """An old key ('K'): the key columns, NULL elsewhere."""
    keycols = KEYS[table.oid]
    return tuple(str(key[keycols.index(i)]) if i in keycols else None
                 for i in range(len(table.columns)))


def random_chunk(rng: random.Random) -> list[Change]:
    table = rng.choice(TABLES)
    n = rng.randint(1, 10)
    one_op = rng.choice([Op.INSERT, Op.UPDATE, Op.DELETE]) if rng.random() < 0.7 else None
    pool = rng.choice([3, 6, 1000])  # small pools make duplicate keys likely
    width = len(KEYS.get(table.oid, (0,)))
    p_toast = rng.choice([0.0, 0.0, 0.2])
    p_old = rng.choice([0.0, 0.0, 0.2])
    p_foreign = rng.choice([0.0, 0.0, 0.1])
    fresh = iter(rng.sample(range(10_000), 20))
    changes: list[Change] = []
    for pos in range(n):
        if rng.random() < p_foreign:
            kind = rng.randrange(3)
            if kind == 0:
                changes.append(Change(Op.TRUNCATE, pos, truncated=(table,)))
            elif kind == 1:
                changes.append(Change(Op.MESSAGE, pos, prefix="p", content=b"x"))
            else:
                other = rng.choice([t for t in (T, U) if t is not table])
                key = tuple(next(fresh) for _ in KEYS[other.oid])
                changes.append(Change(Op.INSERT, pos, other, new=row(other, key, rng, toast=False)))
            continue
        op = one_op or rng.choice([Op.INSERT, Op.UPDATE, Op.DELETE])
        if pool == 1000:
            key = tuple(next(fresh) for _ in range(width))
        else:
            key = tuple(rng.randrange(pool) for _ in range(width))
        keyed = table.oid in KEYS
        if op is Op.INSERT:
            changes.append(Change(Op.INSERT, pos, table, new=row(table, key, rng, toast=False)))
        elif op is Op.UPDATE:
            new = row(table, key, rng, toast=rng.random() < p_toast)
            if keyed and rng.random() < p_old:
                old_key = key if rng.random() < 0.5 else tuple(k + 1 for k in key)
                changes.append(Change(Op.UPDATE, pos, table, new=new,
                                      old=key_row(table, old_key), old_is_key=True))
            elif not keyed and rng.random() < p_old:
                changes.append(Change(Op.UPDATE, pos, table, new=new,
                                      old=row(table, key, rng, toast=False)))
            else:
                changes.append(Change(Op.UPDATE, pos, table, new=new))
        else:
            if keyed and rng.random() < 0.7:
                changes.append(Change(Op.DELETE, pos, table, old=key_row(table, key),
                                      old_is_key=True))
            else:
                changes.append(Change(Op.DELETE, pos, table, old=row(table, key, rng, toast=False)))
    return changes


def chunks(seed: int, count: int) -> Iterator[list[Change]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield random_chunk(rng)


@pytest.mark.parametrize("seed", range(10))
def test_fast_path_gives_the_general_planners_runs(seed: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    taken = not_taken = 0
    for changes in chunks(seed, 400):
        for compact in (frozenset(), frozenset({1, 2})):
            runs = list(plan_runs(changes, KEYS, compact=compact))
            assert runs == general_runs(changes, compact, monkeypatch), changes
        # Every change is in exactly one run, in order (for distinct keys; compact off).
        if fast_expected(changes):
            taken += 1
            first = changes[0]
            assert first.table is not None
            cols = tuple(range(len(first.table.columns))) if first.op is Op.UPDATE else ()
            assert runs == [Run(first.op, first.table, tuple(changes), cols)]
        else:
            not_taken += 1
    assert taken >= 40 and not_taken >= 40  # both sides are exercised


@pytest.mark.parametrize("seed", range(10, 20))
def test_fast_path_is_taken_exactly_for_homogeneous_distinct_whole_row_chunks(seed: int) -> None:
    for changes in chunks(seed, 400):
        single = _plan._single_run(changes, KEYS)
        assert (single is not None) == fast_expected(changes), changes
        if single is not None:
            assert single.changes == tuple(changes)
            # And plan_runs then yields that one run only.
            assert list(plan_runs(changes, KEYS)) == [single]


def test_fast_path_on_handmade_chunks() -> None:
    def ins(k: int) -> Change:
        return Change(Op.INSERT, k, T, new=(str(k), "v", "b"))

    def upd(k: int, *, toast: bool = False, old: int | None = None) -> Change:
        return Change(Op.UPDATE, k, T, new=(str(k), "v", UNCHANGED_TOAST if toast else "b"),
                      old=None if old is None else (str(old), None, None), old_is_key=old is not None)

    assert _plan._single_run([], KEYS) is None
    assert list(plan_runs([], KEYS)) == []
    assert _plan._single_run([ins(1), ins(2), ins(3)], KEYS) == Run(
        Op.INSERT, T, (ins(1), ins(2), ins(3)))
    assert _plan._single_run([upd(1), upd(2)], KEYS) == Run(Op.UPDATE, T, (upd(1), upd(2)),
                                                            (0, 1, 2))
    assert _plan._single_run([ins(1), ins(1)], KEYS) is None  # duplicate key
    assert _plan._single_run([ins(1), upd(2)], KEYS) is None  # mixed ops
    assert _plan._single_run([upd(1), upd(2, toast=True)], KEYS) is None  # placeholder
    assert _plan._single_run([upd(1), upd(2, old=3)], KEYS) is None  # key change
    assert _plan._single_run([upd(1), upd(2, old=2)], KEYS) is None  # old key sent
    assert _plan._single_run([ins(1)], {}) is None  # keyless
    same_name = Table(1, "public", "t", ("id", "v", "big"), (23, 25, 25), (-1, -1, -1), (0,),
                      ReplicaIdentity.DEFAULT)
    other = Change(Op.INSERT, 1, same_name, new=("2", "v", "b"))
    # Tables are compared by identity, as the general planner does.
    assert _plan._single_run([ins(1), other], KEYS) is None
    assert [len(r.changes) for r in plan_runs([ins(1), other], KEYS)] == [1, 1]


def test_a_chunk_is_planned_once_for_every_site() -> None:
    """Every site plans the same chunk: the second plan is the first one's run, holding the
    chunk itself, so the run parameters built from it are shared too (`site.run_params`)."""
    from cdc_sync.sinks.site import run_params

    chunk = tuple(Change(Op.UPDATE, i, T, (str(i), f"v{i}", "b")) for i in range(100))
    (first,) = plan_runs(chunk, KEYS)
    (second,) = plan_runs(chunk, KEYS)
    assert first is second and first.changes is chunk
    assert run_params(first.changes, (0,), first.columns) is run_params(second.changes, (0,),
                                                                          second.columns)
    assert _plan._SHARED_TABLE[(id(chunk), None)] == (chunk, T)  # one_table's verdict, kept too
    as_list = list(chunk)  # a list may change: planned afresh, never kept
    (third,) = plan_runs(as_list, KEYS)
    assert third is not first and third.changes == chunk
    assert (id(as_list), None) not in _plan._SHARED_TABLE

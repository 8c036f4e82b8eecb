"""Split a chunk of changes into runs that one set-based statement can apply.

A run is a maximal sequence of consecutive changes to the same table with the same operation
(and, for updates, the same set of columns sent) in which no row key occurs twice. Applying a
run as one statement then has the same effect as applying its changes one by one, in order:
the changes touch disjoint rows. Pure functions, no I/O; this loop runs once per row change,
so it is written for speed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import countOf, itemgetter
from typing import Any, TypeVar, cast

from ..changes import UNCHANGED_TOAST, Change, Op, Table
from ..protocol import TupleData


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive changes of one `op` to one `table`; `columns` are the indexes an update sets."""

    op: Op
    table: Table | None
    changes: tuple[Change, ...]
    columns: tuple[int, ...] = ()


def sent_columns(new: TupleData) -> tuple[int, ...]:
    """Indexes of the columns whose value was sent (not an unchanged TOAST placeholder)."""
    return tuple(i for i, v in enumerate(new) if v is not UNCHANGED_TOAST)


def _has_placeholder(values: TupleData) -> bool:
    # `in` compares in C (identity first); far cheaper than a generator over the values.
    return UNCHANGED_TOAST in values


def by_table(changes: Sequence[Change]) -> list[Change]:
    """The same changes grouped by table, each table's changes in their order.

    Valid inside one target transaction when nothing links rows of different tables while it
    runs (foreign keys and triggers are off under `session_replication_role = replica`): only
    the final state is visible. Truncates and messages stay barriers.
    """
    out: list[Change] = []
    groups: dict[int, list[Change]] = {}
    for ch in changes:
        table = ch.table
        if table is None:
            for g in groups.values():
                out.extend(g)
            groups = {}
            out.append(ch)
            continue
        groups.setdefault(table.oid, []).append(ch)
    for g in groups.values():
        out.extend(g)
    return out


def plan_runs(changes: Sequence[Change], keys: dict[int, tuple[int, ...]], *,
              compact: frozenset[int] | set[int] = frozenset()) -> Iterator[Run]:
    """Yield runs in order. `keys` maps a table oid to the column indexes identifying a row
    on the site; a table absent from `keys` is keyless: each of its row changes is its own run.

    For tables in `compact`, an update that rewrites a whole row under the same key replaces
    an earlier such update of that key in the run (the earlier one's effect is entirely
    overwritten), instead of ending the run: a hot row updated by every transaction of a batch
    costs one statement, not one per transaction.
    """
    single = _single_run(changes, keys)
    if single is not None:
        yield single
        return
    current: list[Change] = []
    cur_op: Op | None = None
    cur_table: Table | None = None
    cur_cols: tuple[int, ...] = ()
    seen: set[object] = set()
    simple: dict[object, int] = {}  # key -> index in `current` of a whole-row same-key update
    INSERT, UPDATE, DELETE = Op.INSERT, Op.UPDATE, Op.DELETE

    for ch in changes:
        op, table = ch.op, ch.table
        if table is None or op is Op.TRUNCATE or op is Op.MESSAGE:
            if current:
                yield Run(cur_op or op, cur_table, tuple(current), cur_cols)
                current, seen, simple = [], set(), {}
            cur_op, cur_table, cur_cols = op, None, ()
            yield Run(op, table, (ch,))
            continue
        key = keys.get(table.oid)
        cols: tuple[int, ...] = ()
        whole = True
        if op is UPDATE:
            new = ch.new
            assert new is not None
            if _has_placeholder(new):
                cols, whole = sent_columns(new), False
            else:
                cols = _all_columns(table)
        if key is None:
            if current:
                yield Run(cur_op or op, cur_table, tuple(current), cur_cols)
                current, seen, simple = [], set(), {}
            cur_op, cur_table, cur_cols = op, table, cols
            yield Run(op, table, (ch,), cols)
            continue
        # Row identity: the key value itself for one-column keys, else a tuple.
        if op is INSERT:
            vals = ch.new
        elif op is DELETE:
            vals = ch.old
        else:
            vals = ch.new
        assert vals is not None
        k1: object = vals[key[0]] if len(key) == 1 else tuple(vals[i] for i in key)
        k2: object = k1
        if op is UPDATE and ch.old is not None:
            old = ch.old
            k2 = old[key[0]] if len(key) == 1 else tuple(old[i] for i in key)
        same_run = (current and op is cur_op and table is cur_table and cols == cur_cols)
        if same_run and k1 not in seen and k2 not in seen:
            pass
        elif (same_run and op is UPDATE and whole and k1 == k2 and table.oid in compact
              and k1 in simple):
            current[simple[k1]] = ch
            continue
        else:
            if current:
                yield Run(cur_op or op, cur_table, tuple(current), cur_cols)
            current, seen, simple = [], set(), {}
            cur_op, cur_table, cur_cols = op, table, cols
        if op is UPDATE and whole and k1 == k2:
            simple[k1] = len(current)
        current.append(ch)
        seen.add(k1)
        if k2 is not k1:
            seen.add(k2)
    if current:
        yield Run(cur_op or Op.MESSAGE, cur_table, tuple(current), cur_cols)


_OP = itemgetter(0)  # Change fields, by position (Change is a NamedTuple)
_TABLE = itemgetter(2)
NEW_OF = itemgetter(3)
OLD_OF = itemgetter(4)


def one_table(changes: Sequence[Change]) -> Table | None:
    """The table when every change is a row change of that one `Table` object (compared by
    identity, as the planner does), else None. In C: no per-change Python loop; and computed
    once per chunk (a tuple) for every site."""
    if not changes:
        return None
    if type(changes) is tuple:
        return per_chunk(_SHARED_TABLE, changes, None, lambda: _one_table(changes))
    return _one_table(changes)


def _one_table(changes: Sequence[Change]) -> Table | None:
    table = changes[0].table
    if table is None or list(map(id, map(_TABLE, changes))).count(id(table)) != len(changes):
        return None
    return table


# Every site plans the same chunks (decode once, fan out): what is worked out from a chunk (a
# tuple, never changed) is kept for the others, with the chunk itself, so its id cannot be
# reused meanwhile. A few chunks are enough: the sites are at most a queue apart.
_SHARED_MAX = 8
_shared_lock = threading.Lock()
T = TypeVar("T")


def per_chunk(cache: dict[tuple[int, Any], tuple[Sequence[Change], Any]],
              changes: Sequence[Change], key: Any, compute: Callable[[], T]) -> T:
    """`compute()` for chunk `changes` and `key`, once for every site (see above)."""
    cache_key = (id(changes), key)
    hit = cache.get(cache_key)
    if hit is not None and hit[0] is changes:
        return cast(T, hit[1])
    value = compute()
    with _shared_lock:
        if len(cache) >= _SHARED_MAX:
            cache.pop(next(iter(cache)))
        cache[cache_key] = (changes, value)
    return value


_SHARED_TABLE: dict[tuple[int, Any], tuple[Sequence[Change], Any]] = {}
_SHARED_SINGLE: dict[tuple[int, Any], tuple[Sequence[Change], Any]] = {}


def _single_run(changes: Sequence[Change], keys: dict[int, tuple[int, ...]]) -> Run | None:
    """The whole chunk as one run, when that is plain to see (the common case of a big
    transaction): one op on one keyed table, distinct keys, whole rows, no key changes. None
    when any of that does not hold (the general planner then decides)."""
    table = one_table(changes)  # row changes only: truncates and messages have no table
    if table is None:
        return None
    key = keys.get(table.oid)
    if type(changes) is tuple:
        return per_chunk(_SHARED_SINGLE, changes, key,
                         lambda: _whole_chunk_run(changes, table, key))
    return _whole_chunk_run(changes, table, key)


def _whole_chunk_run(changes: Sequence[Change], table: Table, key: tuple[int, ...] | None
                     ) -> Run | None:
    op = changes[0].op
    n = len(changes)
    # Whole-chunk checks in C (map/itemgetter, list.count) instead of per-change Python loops.
    if key is None or list(map(_OP, changes)).count(op) != n:
        return None
    cols: tuple[int, ...] = ()
    if op is Op.DELETE:
        rows = list(map(OLD_OF, changes))
    else:
        rows = list(map(NEW_OF, changes))
        if op is Op.UPDATE:
            if list(map(OLD_OF, changes)).count(None) != n \
                    or countOf(chain.from_iterable(rows), UNCHANGED_TOAST):
                return None
            cols = _all_columns(table)
    if len(key) == 1:
        distinct = len(set(map(itemgetter(key[0]), rows)))
    else:
        distinct = len(set(map(itemgetter(*key), rows)))
    if distinct != n:
        return None
    # (a tuple stays the same object: run_params' cache across sites is keyed by it)
    return Run(op, table, tuple(changes), cols)


_ALL: dict[int, tuple[int, ...]] = {}


def _all_columns(table: Table) -> tuple[int, ...]:
    n = len(table.columns)
    cols = _ALL.get(n)
    if cols is None:
        cols = _ALL[n] = tuple(range(n))
    return cols

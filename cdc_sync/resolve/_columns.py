"""Per-column last-writer-wins (`merge_columns = true`): each column keeps its own last writer.

Pure: the standard library and the resolver's model. `PolicyResolver` calls `resolve_columns`
for a table whose policy is `lww` with `merge_columns` (ordered by commit time; a version
column does not apply).

State of a key at a site: a row whose every column is a cell (value, clock), or a tombstone T
that keeps the deleted row's cells (`Tombstone.values`/`clocks`). A clock (commit time,
office) has the key (time, 0, office); T's key is (its commit time, 1, office). `follows` is
the resolver's: the same office (its stream is ordered), else a greater key. A column without
a clock (a row from the initial copy, or written before the table had `merge_columns`) is
older than every write.

- A write W (insert or update) sets the cells of the columns it changed, each only where W's
  clock follows that column's clock: an insert changes every column, an update those whose new
  value differs from its old one (which is why the source needs REPLICA IDENTITY FULL: without
  a full old row every column sent counts as changed, and the table merges whole rows).
  Counter columns take their deltas (as in every strategy) and are never cells.
- Against a row: the columns W wins are written, the others kept (`merged` when both happen).
- Against a tombstone: W's cells merge into the kept cells; the row comes back (with every
  cell's value: kept values where W did not change a column) iff W follows T, else the key
  stays deleted with the merged cells kept for a later write.
- A delete D removes the row iff D follows every cell's clock (a later write to any column
  keeps the row, with its cells as they are), and leaves T with the row's cells. Against a
  tombstone it replaces T when it follows it and keeps the cells.

Every rule is a per-cell maximum plus "the row exists iff some cell follows the latest
delete", so every office ends the same whatever order the three offices' streams interleave
in (the property test in tests/resolve/test_columns.py). Commit times of local writes come
from `pg_xact_commit_timestamp` of the writing transaction (the site's trigger records its
xid), so a site dates its own writes exactly as the other offices do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdc_sync.changes import Op

from ._model import Clock, Clocks, Decision, Incoming, LocalRow, Tombstone, Values
from ._versions import Version, timestamp_version

if TYPE_CHECKING:
    from ._policies import PolicyResolver

__all__ = ["changed_columns", "resolve_columns"]

_Key = tuple[Version, int, str]
Row = dict[str, str | None]


def _follows(a: _Key, b: _Key | None) -> bool:
    return b is None or a[2] == b[2] or a > b


def _cell_key(clock: Clock | None, site: str) -> _Key | None:
    if clock is None:
        return None
    return timestamp_version(clock[0]), 0, clock[1] or site


def changed_columns(incoming: Incoming, counters: frozenset[str]) -> frozenset[str]:
    """The columns a write sets as cells: every column an insert sends; for an update with a
    full old row, the columns whose value changed; otherwise every column sent."""
    new = incoming.new or {}
    old = incoming.old
    if incoming.op is Op.UPDATE and incoming.old_is_full and old is not None:
        cols = {c for c, v in new.items() if c not in old or old[c] != v}
    else:
        cols = set(new)
    return frozenset(cols - counters)


def resolve_columns(r: PolicyResolver, local: LocalRow | None, incoming: Incoming,
                    tombstone: Tombstone | None) -> Decision:
    """The decision of `r` (merge_columns) for one change; see the module docstring."""
    site = r.site
    if incoming.op is Op.DELETE:
        return _delete(r, local, incoming, tombstone)
    if incoming.new is None:
        raise ValueError(f"{incoming.op.value} change for {r.table} without a new row")
    clock: Clock = (incoming.commit_ts, incoming.origin)
    key = _cell_key(clock, site)
    assert key is not None
    row, complete = r.incoming_row(incoming, local)
    changed = changed_columns(incoming, r.counters)
    if local is not None:
        clocks = dict(local.clocks or {})
        values: Row = dict(local.values)
        taken = [c for c in sorted(changed) if _follows(key, _cell_key(clocks.get(c), site))]
        lost = len(changed) - len(taken)
        counters = r.counter_values(local, incoming)
        if incoming.op is Op.INSERT:
            conflict: str | None = "insert_insert"
        else:
            conflict = "update_update" if lost or r.differs(local, incoming) else None
        if not taken and all(values.get(c) == v for c, v in counters.items()):
            return Decision("skip", None, conflict, "local_wins")
        for c in taken:
            values[c] = row[c]
            clocks[c] = clock
        values.update(counters)
        if conflict is None:
            outcome = "applied"
        elif not lost:
            outcome = "incoming_wins"
        else:
            outcome = "merged" if taken else "local_wins"
        return Decision("write", values, conflict, outcome, clocks=clocks)
    if tombstone is not None:
        kept: Row = dict(tombstone.values or {})
        clocks = dict(tombstone.clocks or {})
        for c in sorted(changed):
            if _follows(key, _cell_key(clocks.get(c), site)):
                kept[c] = row[c]
                clocks[c] = clock
        for c, v in row.items():  # columns with no cell yet: the incoming row's value
            kept.setdefault(c, v)
        whole = all(c in kept for c in incoming.unchanged)
        t_key: _Key = (timestamp_version(tombstone.deleted_at), 1, tombstone.origin or site)
        newer = _follows(key, t_key)
        is_insert = incoming.op is Op.INSERT
        conflict = ("insert_deleted" if not newer else None) if is_insert else "update_delete"
        if newer and (whole or complete):
            return Decision("write", kept, conflict, "incoming_wins" if conflict else "applied",
                            clocks=clocks)
        # A local delete's tombstone is kept under this site's name: rewritten by us, its
        # row's commit time would read as ours (the source's, under our replication origin).
        return Decision("delete", None, conflict, "kept_deleted", Tombstone(
            tombstone.deleted_at, tombstone.version, tombstone.origin or site, kept, clocks))
    if incoming.op is Op.INSERT or complete:
        conflict = None if incoming.op is Op.INSERT else "update_missing"
        return Decision("write", row, conflict, "applied" if conflict is None else
                        "incoming_wins", clocks={c: clock for c in changed})
    return Decision("skip", None, "update_missing", "local_wins")


def _delete(r: PolicyResolver, local: LocalRow | None, incoming: Incoming,
            tombstone: Tombstone | None) -> Decision:
    site = r.site
    d_key: _Key = (timestamp_version(incoming.commit_ts), 1, incoming.origin)
    if local is not None:
        clocks: Clocks = local.clocks or {}
        cell_keys = [k for k in (_cell_key(c, site) for c in clocks.values()) if k is not None]
        wins = all(_follows(d_key, k) for k in cell_keys)
        concurrent = any(k[2] != d_key[2] and k[0] >= d_key[0] for k in cell_keys)
        conflict = "delete_update" if concurrent or r.differs(local, incoming) else None
        if not wins:
            return Decision("skip", None, conflict, "local_wins")
        return Decision("delete", None, conflict, "deleted" if conflict else "applied",
                        Tombstone(incoming.commit_ts, None, incoming.origin,
                                  _text_values(local.values), dict(clocks)))
    if tombstone is not None:
        t_key: _Key = (timestamp_version(tombstone.deleted_at), 1, tombstone.origin or site)
        if not _follows(d_key, t_key):
            return Decision("skip", None, "delete_missing", "kept_deleted")
        return Decision("delete", None, "delete_missing", "deleted", Tombstone(
            incoming.commit_ts, None, incoming.origin, tombstone.values, tombstone.clocks))
    return Decision("delete", None, "delete_missing", "deleted",
                    Tombstone(incoming.commit_ts, None, incoming.origin))


def _text_values(values: Values) -> Row:
    return dict(values)

"""The conflict policies: `make_resolver(policy, site=...)` and the rules it implements.

Pure: imports the standard library, `cdc_sync.changes` (for `Op`) and, for type checking only,
`cdc_sync.config.ResolvedPolicy`. The merge function is loaded once, in `make_resolver`.

Order of writes. Every row state, tombstone and change has a key `(version, is_delete,
origin)`, compared as a tuple:
- `version`: for an insert/update or a row, the policy's `version_column` parsed by
  `parse_version` (int/numeric/timestamp/raw text; NULL and incomparable values lowest), or
  without a version column the commit timestamp (`LocalRow.commit_ts`, `Incoming.commit_ts`).
  For a delete (and its tombstone) `delete_version(V, C)`: C its commit time, V the deleted
  row's version when known (a full old row; a key-only delete meeting a row whose version is
  not a timestamp deletes what it finds and takes that version). Unknown V: C; a timestamp V:
  the later of V and C; another V: V. Without a version column: C.
- `is_delete`: 1 for deletes and tombstones, 0 for writes and rows: a delete of version V
  beats every write of V, whichever office wrote it.
- `origin`: the office (`LocalRow.origin`/`Tombstone.origin` "" is this site): equal versions
  break by the larger name, so every office decides the same for the same pair of writes.
A change follows a state when the same office made both (its stream is ordered: its later
change always wins, e.g. a delete and a re-insert in one transaction) or its key is greater.
A tombstone left by a local delete (origin "", written by the trigger with the deleted
row's version) of a table whose deletes travel key-only is read as the other offices read
that delete: a timestamp version is ignored (commit time only).

The incoming row. For an insert/update, the row the change describes is `new`, with the columns
that were not sent (unchanged TOAST) taken from `old` when `old_is_full` (that is exactly the
source's value), else from the local row. Without a local row it is complete when every column
named in `Incoming.unchanged` could be filled that way.

Conflicts (informational except where a strategy uses them):
- insert, local row: `insert_insert`.
- update, local row: `update_update` when `old_is_full` and the local values differ from `old`
  (counter columns ignored), or when the incoming version does not follow the local one (it is
  lower, or equal from another origin).
- update, no local row: `update_delete` with a tombstone, else `update_missing`.
- insert, no local row, a tombstone the insert does not follow: `insert_deleted`.
- delete, local row: `delete_update` when `old_is_full` and the local values differ from `old`,
  or the local row's version is above the delete's (`delete_version` above: a key-only delete
  is dated by its commit time, and on a non-timestamp version it deletes what it finds).
- delete, no local row: `delete_missing`.

Strategies (W = the incoming insert/update, D = the incoming delete, T = the tombstone):
- `source_wins`: W is written (an update without local row only if its row is complete, else
  skip); D deletes. Conflicts are still reported.
- `lww`: W or D is applied iff it follows the state it meets (the row, else the tombstone);
  without either, W is written (an update only when its row is complete) and D records its
  tombstone. A losing W against a tombstone is `kept_deleted`, a losing D against a row
  `local_wins`. So a late stale insert/update never resurrects a deleted row, a newer one
  does, and a delete of the version a site holds always removes it.
- `first_write_wins` (the mirror of `lww`, for rows): W applies when it does not conflict (it
  follows the row: same office, or a strictly higher version, and with a full `old` the row is
  the one it started from). In a conflict with a local row the earlier write is kept: W wins iff
  it does not follow the row (its key is lower). Deletes win over concurrent updates: D always
  deletes a row, an update meeting T stays deleted. An insert meeting T and a D meeting only T
  are decided as in `lww` (a later re-insert revives the key). Every decision depends only on
  the two keys (and, with a full `old`, the values), so all offices decide a pair alike; it
  converges for concurrent writes from one common state. It needs REPLICA IDENTITY FULL to tell
  a concurrent update from a later one (without `old`, a higher version or later commit is
  taken as a successor), and it does not order chains of writes on both sides of a conflict.
- `merge`: non-conflicting changes apply; on a conflict the user's function is called as
  `fn(local, incoming, change)` with fresh dicts (`local`: the local values or None; `incoming`:
  the incoming row as above, counters already merged, or None for a delete). A mapping result is
  written (`merged`; values other than str/None are turned into PostgreSQL text), None deletes
  the local row — or skips when there is none (a delete with no local row is still a `delete`, so
  the tombstone is recorded). Exceptions propagate to the applier.
- `counters` (any strategy): for an update with `old_is_full` and a local row, each counter
  column sent in `new` and present in `old` becomes `local + (new - old)` (exact decimal, text
  scale kept unless more digits are needed) whichever side wins the other columns; a local row
  that wins still gets the counter deltas (`write`, outcome `local_wins`). A column whose value is
  NULL or not a finite number, and every change without `old` or local row, follows the strategy.

Per-column merge (`merge_columns`, with `lww` on commit time): each column has its own last
writer; the rules are in `_columns`.

Delete-with-no-local-row (every strategy): a tombstone D does not follow is kept (`skip`,
`kept_deleted`); otherwise the decision is `delete`, which records the new tombstone.

Tombstones to record (`Decision.tombstone`): `deleted_at` = the delete's commit time, `origin` =
its origin, `version` = V above (None when the delete is dated by its commit time alone).

State after a decision (`Decision.local_after`): a `write` is the site row committed at the
incoming commit time by the incoming origin, except a `local_wins` write (only counter deltas
moved) which keeps the local row's commit time and origin. Limitation: a row written by a merge
function takes the incoming change's key.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, cast

from cdc_sync.changes import Op
from cdc_sync.config import local_rows_needed

from ._columns import resolve_columns
from ._model import Decision, Incoming, LocalRow, Resolver, Tombstone, Values
from ._versions import (
    Version,
    add_delta,
    delete_version,
    is_timestamp,
    parse_version,
    timestamp_version,
)

if TYPE_CHECKING:
    from cdc_sync.config import ResolvedPolicy

__all__ = ["MergeFunction", "PolicyResolver", "make_resolver"]

Row = dict[str, str | None]
MergeFunction = Callable[[Row | None, Row | None, Incoming], Mapping[str, object] | None]
_Key = tuple[Version, int, str]  # (version, is_delete, origin)

STRATEGIES = ("source_wins", "lww", "first_write_wins", "merge")


def make_resolver(policy: ResolvedPolicy, *, site: str) -> Resolver:
    """The resolver of `policy` for the site called `site`; loads the merge function once
    (a `ConfigError` from `policy.load_merge()` propagates)."""
    merge = cast(MergeFunction, policy.load_merge()) if policy.strategy == "merge" else None
    return PolicyResolver(policy.table, policy.strategy, version_column=policy.version_column,
                          counters=policy.counters, site=site, merge=merge,
                          merge_columns=policy.merge_columns)


def _follows(a: _Key, b: _Key) -> bool:
    """Write `a` comes after state `b`: the same office wrote both (its stream is ordered, so
    the incoming one is its later write), or `a`'s key (version, is_delete, origin) is
    greater: a higher version; at an equal version a delete before a write, then the larger
    origin name."""
    return a[2] == b[2] or a > b


def _succeeds(a: _Key, b: _Key) -> bool:
    """`a` follows `b` without a tie to break (the same office, or a strictly higher version):
    anything else is reported as a conflict, whoever wins it."""
    return a[2] == b[2] or a[0] > b[0]


def _text(value: object, column: str, table: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, _dt.date | _dt.time):  # datetime is a date
        return value.isoformat()
    raise TypeError(f"merge function for {table} returned a {type(value).__name__} for column "
                    f"{column!r}; expected str, None, bool, a number or a date/time")


class PolicyResolver:
    """A `Resolver` for one table's policy at one site (see the module docstring)."""

    __slots__ = ("_counters", "_merge", "_version_column", "merge_columns", "needs_local_rows",
                 "site", "strategy", "table")

    def __init__(self, table: str, strategy: str, *, version_column: str | None = None,
                 counters: tuple[str, ...] = (), site: str,
                 merge: MergeFunction | None = None, merge_columns: bool = False) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown conflict strategy {strategy!r}")
        if merge_columns and (strategy != "lww" or version_column is not None):
            raise ValueError(f'merge_columns for {table} needs strategy "lww" without a '
                             "version_column (columns are ordered by commit time)")
        if strategy == "merge" and merge is None:
            raise ValueError(f'strategy "merge" for {table} needs a merge function')
        self.table = table
        self.strategy = strategy
        self.site = site
        self._version_column = version_column
        self._counters = frozenset(counters)
        self._merge = merge
        self.merge_columns = merge_columns
        self.needs_local_rows: bool = local_rows_needed(strategy, counters)

    @property
    def version_column(self) -> str | None:
        """The policy's version column; None: commit timestamps order the writes."""
        return self._version_column

    @property
    def counters(self) -> frozenset[str]:
        return self._counters

    def __repr__(self) -> str:
        return (f"PolicyResolver({self.table!r}, {self.strategy!r}, "
                f"version_column={self._version_column!r}, counters={sorted(self._counters)!r}, "
                f"site={self.site!r}, merge_columns={self.merge_columns!r})")

    # -- the entry point ---------------------------------------------------------------------

    def resolve(self, local: LocalRow | None, incoming: Incoming,
                tombstone: Tombstone | None) -> Decision:
        if self.merge_columns:
            return resolve_columns(self, local, incoming, tombstone)
        op = incoming.op
        if op is Op.DELETE:
            return self._delete(local, incoming, tombstone)
        if op is not Op.INSERT and op is not Op.UPDATE:
            raise ValueError(f"cannot resolve a {op.value} change")
        if incoming.new is None:
            raise ValueError(f"{op.value} change for {self.table} without a new row")
        row, complete = self._incoming_row(incoming, local)
        if local is not None:
            return self._against_row(local, incoming, row)
        if tombstone is not None:
            return self._against_tombstone(incoming, row, complete, tombstone)
        if op is Op.INSERT:
            return Decision("write", row, None, "applied")
        # An update of a row this site does not have, and no tombstone.
        if self.strategy == "merge":
            return self._merged(None, row, incoming, "update_missing", none_means="local_wins")
        if complete:
            return Decision("write", row, "update_missing", "incoming_wins")
        return Decision("skip", None, "update_missing", "local_wins")

    # -- inserts and updates ---------------------------------------------------------------------

    def _against_row(self, local: LocalRow, incoming: Incoming, row: Row) -> Decision:
        in_key = self._row_key(row, incoming)
        local_key = self._local_key(local)
        if incoming.op is Op.INSERT:
            conflict: str | None = "insert_insert"
        elif self._differs(local, incoming) or not _succeeds(in_key, local_key):
            conflict = "update_update"
        else:
            conflict = None
        counters = self._counter_values(local, incoming)
        strategy = self.strategy
        if strategy == "merge" and conflict is not None:
            return self._merged(local, {**row, **counters}, incoming, conflict,
                                none_means="deleted")
        if strategy == "lww":
            incoming_wins = _follows(in_key, local_key)
        elif strategy == "first_write_wins":
            incoming_wins = conflict is None or not _follows(in_key, local_key)
        else:  # source_wins, or merge without a conflict
            incoming_wins = True
        if incoming_wins:
            return Decision("write", {**row, **counters}, conflict,
                            "incoming_wins" if conflict else "applied")
        kept = dict(local.values)
        if all(kept.get(column) == value for column, value in counters.items()):
            return Decision("skip", None, conflict, "local_wins")
        return Decision("write", {**kept, **counters}, conflict, "local_wins")

    def _against_tombstone(self, incoming: Incoming, row: Row, complete: bool,
                           tombstone: Tombstone) -> Decision:
        in_key = self._row_key(row, incoming)
        newer = _follows(in_key, self._tombstone_key(tombstone, incoming))
        is_insert = incoming.op is Op.INSERT
        conflict = ("insert_deleted" if not newer else None) if is_insert else "update_delete"
        strategy = self.strategy
        if strategy == "merge":
            if conflict is None:
                return Decision("write", row, None, "applied")
            return self._merged(None, row, incoming, conflict, none_means="kept_deleted")
        if strategy == "source_wins":
            wins = complete
        elif strategy == "first_write_wins" and not is_insert:
            wins = False  # deletes win over concurrent updates
        else:
            wins = newer and complete
        if wins:
            return Decision("write", row, conflict, "incoming_wins" if conflict else "applied")
        return Decision("skip", None, conflict, "kept_deleted")

    # -- deletes ------------------------------------------------------------------------------

    def _delete(self, local: LocalRow | None, incoming: Incoming,
                tombstone: Tombstone | None) -> Decision:
        deleted = self._deleted_version(incoming, local)
        del_key = self._delete_key(incoming, deleted)
        new_tombstone = Tombstone(incoming.commit_ts, deleted, incoming.origin)
        if local is None:
            if tombstone is not None and not _follows(
                    del_key, self._tombstone_key(tombstone, incoming)):
                return Decision("skip", None, "delete_missing", "kept_deleted")
            if self.strategy == "merge":
                return self._merged(None, None, incoming, "delete_missing", none_means="deleted",
                                    tombstone=new_tombstone)
            return Decision("delete", None, "delete_missing", "deleted", new_tombstone)
        local_key = self._local_key(local)
        delete_wins = _follows(del_key, local_key)
        # A delete of the very version held is no conflict (a delete sorts after that write).
        succeeds = del_key[2] == local_key[2] or del_key[0] >= local_key[0]
        conflict = ("delete_update" if not succeeds or self._differs(local, incoming)
                    else None)
        if conflict is None:
            return Decision("delete", None, None, "applied", new_tombstone)
        if self.strategy == "merge":
            return self._merged(local, None, incoming, conflict, none_means="deleted",
                                tombstone=new_tombstone)
        if self.strategy == "lww" and not delete_wins:
            return Decision("skip", None, conflict, "local_wins")
        return Decision("delete", None, conflict, "deleted", new_tombstone)

    def _deleted_version(self, incoming: Incoming, local: LocalRow | None) -> str | None:
        """The version-column text of the row a delete deleted, when known: from a full old
        row; for a key-only delete, the local row's version when it is not a timestamp (a
        commit time cannot be compared with it: the delete deletes what it finds). None: the
        delete is dated by its commit time alone."""
        column = self._version_column
        if column is None:
            return None
        old = incoming.old
        if incoming.old_is_full and old is not None and column in old:
            return old[column]
        if local is not None:
            held = local.values.get(column)
            if held is not None and not is_timestamp(parse_version(held)):
                return held
        return None

    # -- the merge function ----------------------------------------------------------------------

    def _merged(self, local: LocalRow | None, incoming_row: Row | None, incoming: Incoming,
                conflict: str, *, none_means: str,
                tombstone: Tombstone | None = None) -> Decision:
        assert self._merge is not None
        result = self._merge(dict(local.values) if local is not None else None,
                             dict(incoming_row) if incoming_row is not None else None, incoming)
        if result is not None:
            if not isinstance(result, Mapping):
                raise TypeError(f"merge function for {self.table} returned a "
                                f"{type(result).__name__}; expected a dict or None")
            row = {str(k): _text(v, str(k), self.table) for k, v in result.items()}
            return Decision("write", row, conflict, "merged")
        if none_means == "deleted":
            if tombstone is None:  # the merge function deleted the local row
                version = None
                if self._version_column is not None and local is not None:
                    version = local.values.get(self._version_column)
                tombstone = Tombstone(incoming.commit_ts, version, incoming.origin)
            return Decision("delete", None, conflict, "deleted", tombstone)
        return Decision("skip", None, conflict, none_means)

    # -- rows, keys, counters --------------------------------------------------------------------

    def incoming_row(self, incoming: Incoming, local: LocalRow | None) -> tuple[Row, bool]:
        """The full row an insert/update describes, and whether it is complete without
        `local` (see the module docstring)."""
        return self._incoming_row(incoming, local)

    def differs(self, local: LocalRow, incoming: Incoming) -> bool:
        """With a full `old`: whether the local row is not the row the change started from."""
        return self._differs(local, incoming)

    def counter_values(self, local: LocalRow, incoming: Incoming) -> Row:
        """The counter columns of an update applied as deltas to the local row."""
        return self._counter_values(local, incoming)

    def _incoming_row(self, incoming: Incoming, local: LocalRow | None) -> tuple[Row, bool]:
        """The full row the change describes, and whether it is complete without `local`."""
        assert incoming.new is not None
        row: Row = dict(incoming.new)
        old = incoming.old
        if incoming.old_is_full and old is not None:
            for column, value in old.items():
                row.setdefault(column, value)
        complete = all(column in row for column in incoming.unchanged)
        if local is not None and not local.values.keys() <= row.keys():
            for column, value in local.values.items():
                row.setdefault(column, value)
        return row, complete

    def _differs(self, local: LocalRow, incoming: Incoming) -> bool:
        """With a full `old`: whether the local row is not the row the change started from."""
        old = incoming.old
        if not incoming.old_is_full or old is None:
            return False
        values = local.values
        return any(values[column] != value for column, value in old.items()
                   if column in values and column not in self._counters)

    def _counter_values(self, local: LocalRow, incoming: Incoming) -> Row:
        if (not self._counters or incoming.op is not Op.UPDATE or not incoming.old_is_full
                or incoming.old is None or incoming.new is None):
            return {}
        new, old, values = incoming.new, incoming.old, local.values
        merged: Row = {}
        for column in self._counters:
            if column in new and column in old and column in values:
                value = add_delta(values[column], new[column], old[column])
                if value is not None:
                    merged[column] = value
        return merged

    def _version(self, values: Values) -> Version:
        assert self._version_column is not None
        return parse_version(values.get(self._version_column))

    def _local_key(self, local: LocalRow) -> _Key:
        if self._version_column is None:
            version = timestamp_version(local.commit_ts)
        else:
            version = self._version(local.values)
        return version, 0, local.origin or self.site

    def _row_key(self, row: Values, incoming: Incoming) -> _Key:
        if self._version_column is None:
            return timestamp_version(incoming.commit_ts), 0, incoming.origin
        return self._version(row), 0, incoming.origin

    def _tombstone_key(self, tombstone: Tombstone, incoming: Incoming) -> _Key:
        """A tombstone's key, read as every office reads the delete that left it. A local
        delete's tombstone (origin "", written by the site's trigger) always holds the deleted
        row's version; when the table's deletes travel key-only (`incoming.old_is_full` is
        false: the replica identity is the same at every office), the other offices date that
        delete by its commit time alone, so a timestamp version is ignored here too."""
        if self._version_column is None:
            return timestamp_version(tombstone.deleted_at), 1, tombstone.origin or self.site
        version = tombstone.version
        if (version is not None and not tombstone.origin and not incoming.deletes_full
                and is_timestamp(parse_version(version))):
            version = None
        return (delete_version(version, tombstone.deleted_at), 1,
                tombstone.origin or self.site)

    def _delete_key(self, incoming: Incoming, deleted: str | None) -> _Key:
        if self._version_column is None:
            return timestamp_version(incoming.commit_ts), 1, incoming.origin
        return delete_version(deleted, incoming.commit_ts), 1, incoming.origin

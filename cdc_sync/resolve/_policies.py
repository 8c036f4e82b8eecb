"""The conflict policies: `make_resolver(policy, site=...)` and the rules it implements.

Pure: imports the standard library, `cdc_sync.changes` (for `Op`) and, for type checking only,
`cdc_sync.config.ResolvedPolicy`. The merge function is loaded once, in `make_resolver`.

Order of writes. Every row state and every change has a key `(version, origin)`:
`version` is the policy's `version_column` parsed by `parse_version` (int/numeric/timestamp/raw
text; NULL and incomparable values lowest), or without a version column the commit timestamp
(`LocalRow.commit_ts`, `Incoming.commit_ts`, `Tombstone.deleted_at`); `origin` is the office
that wrote it. Keys compare lexicographically, so equal versions break by origin name (the larger
wins) and every site decides the same for the same pair of writes. Equal keys mean the same
origin wrote both; its stream is ordered, so the incoming change is the later one and wins.

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
- insert, no local row, tombstone not older than the insert: `insert_deleted`.
- delete, local row: `delete_update` when `old_is_full` and the local values differ from `old`,
  or the local row is newer (with a version column: the local version is above the deleted row's
  version `old[version_column]`; a delete without that value is taken to delete what is there).
- delete, no local row: `delete_missing`.

Strategies (W = the incoming insert/update, D = the incoming delete, T = the tombstone):
- `source_wins`: W is written (an update without local row only if its row is complete, else
  skip); D deletes. Conflicts are still reported.
- `lww`: W vs local row: W wins iff key(W) >= key(local). D vs local row: without a version
  column D wins iff key(D) >= key(local) with key(D) = (delete commit time, origin); with one, D
  wins iff the deleted version >= the local version (a delete wins ties). W vs T: W wins iff it
  is newer — without a version column key(W) >= key(T); with one a strictly higher version, or an
  equal one from T's own origin — and, for an update, its row is complete; else `kept_deleted`.
  So a late stale insert/update never resurrects a deleted row and a newer one does.
- `first_write_wins`: non-conflicting changes apply. In a conflict with a local row the lower
  key wins (W wins iff key(W) <= key(local)). Deletes win over concurrent updates: D always
  deletes, an update vs T stays deleted; an insert vs T is decided as in `lww`.
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

Delete-with-no-local-row (every strategy): a tombstone at least as new as D is kept (`skip`,
`kept_deleted`); otherwise the decision is `delete`, which records the new tombstone.

Tombstones to record (`Decision.tombstone`): `deleted_at` = the delete's commit time, `origin` =
its origin, `version` = the deleted row's version text (`old`, else the local row) when the
policy has a version column. Limitation: a `write` decision is committed at the incoming commit
time by the incoming origin, so under commit-timestamp ordering a row written because of a
counter merge or a merge function takes the incoming change's key.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, cast

from cdc_sync.changes import Op
from cdc_sync.config import local_rows_needed

from ._model import Decision, Incoming, LocalRow, Resolver, Tombstone, Values
from ._versions import Version, add_delta, parse_version, timestamp_version

if TYPE_CHECKING:
    from cdc_sync.config import ResolvedPolicy

__all__ = ["MergeFunction", "PolicyResolver", "make_resolver"]

Row = dict[str, str | None]
MergeFunction = Callable[[Row | None, Row | None, Incoming], Mapping[str, object] | None]
_Key = tuple[Version, str]

STRATEGIES = ("source_wins", "lww", "first_write_wins", "merge")


def make_resolver(policy: ResolvedPolicy, *, site: str) -> Resolver:
    """The resolver of `policy` for the site called `site`; loads the merge function once
    (a `ConfigError` from `policy.load_merge()` propagates)."""
    merge = cast(MergeFunction, policy.load_merge()) if policy.strategy == "merge" else None
    return PolicyResolver(policy.table, policy.strategy, version_column=policy.version_column,
                          counters=policy.counters, site=site, merge=merge)


def _follows(a: _Key, b: _Key) -> bool:
    """`a` is later than `b` without a tie to break: a higher version, or the same version
    from the same origin (whose stream is ordered)."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] == b[1])


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

    __slots__ = ("_counters", "_merge", "_version_column", "needs_local_rows", "site",
                 "strategy", "table")

    def __init__(self, table: str, strategy: str, *, version_column: str | None = None,
                 counters: tuple[str, ...] = (), site: str,
                 merge: MergeFunction | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown conflict strategy {strategy!r}")
        if strategy == "merge" and merge is None:
            raise ValueError(f'strategy "merge" for {table} needs a merge function')
        self.table = table
        self.strategy = strategy
        self.site = site
        self._version_column = version_column
        self._counters = frozenset(counters)
        self._merge = merge
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
                f"site={self.site!r})")

    # -- the entry point ---------------------------------------------------------------------

    def resolve(self, local: LocalRow | None, incoming: Incoming,
                tombstone: Tombstone | None) -> Decision:
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
        elif self._differs(local, incoming) or not _follows(in_key, local_key):
            conflict = "update_update"
        else:
            conflict = None
        counters = self._counter_values(local, incoming)
        strategy = self.strategy
        if strategy == "merge" and conflict is not None:
            return self._merged(local, {**row, **counters}, incoming, conflict,
                                none_means="deleted")
        if strategy == "lww":
            incoming_wins = in_key >= local_key
        elif strategy == "first_write_wins":
            incoming_wins = conflict is None or in_key <= local_key
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
        tomb_key = self._tombstone_key(tombstone)
        if self._version_column is None:
            newer = in_key >= tomb_key
        else:
            newer = _follows(in_key, tomb_key)
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
        del_key = self._delete_key(incoming)  # version None: the deleted version is unknown
        new_tombstone = self._new_tombstone(local, incoming)
        if local is None:
            if tombstone is not None and not self._delete_beats_tombstone(del_key, tombstone):
                return Decision("skip", None, "delete_missing", "kept_deleted")
            if self.strategy == "merge":
                return self._merged(None, None, incoming, "delete_missing", none_means="deleted",
                                    tombstone=new_tombstone)
            return Decision("delete", None, "delete_missing", "deleted", new_tombstone)
        local_key = self._local_key(local)
        deleted, origin = del_key
        if deleted is None:
            local_newer, delete_wins = False, True
        elif self._version_column is None:
            key = (deleted, origin)
            local_newer, delete_wins = not _follows(key, local_key), key >= local_key
        else:
            local_newer, delete_wins = local_key[0] > deleted, deleted >= local_key[0]
        conflict = "delete_update" if local_newer or self._differs(local, incoming) else None
        if conflict is None:
            return Decision("delete", None, None, "applied", new_tombstone)
        if self.strategy == "merge":
            return self._merged(local, None, incoming, conflict, none_means="deleted",
                                tombstone=new_tombstone)
        if self.strategy == "lww" and not delete_wins:
            return Decision("skip", None, conflict, "local_wins")
        return Decision("delete", None, conflict, "deleted", new_tombstone)

    def _delete_beats_tombstone(self, del_key: tuple[Version | None, str],
                                tombstone: Tombstone) -> bool:
        """Whether a delete of a missing row is newer than the tombstone already there."""
        deleted, origin = del_key
        if deleted is None:
            return False
        tomb_key = self._tombstone_key(tombstone)
        if self._version_column is None:
            return (deleted, origin) > tomb_key
        return deleted > tomb_key[0]

    def _new_tombstone(self, local: LocalRow | None, incoming: Incoming) -> Tombstone:
        version: str | None = None
        column = self._version_column
        if column is not None:
            if incoming.old is not None and column in incoming.old:
                version = incoming.old[column]
            elif local is not None:
                version = local.values.get(column)
        return Tombstone(incoming.commit_ts, version, incoming.origin)

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

    def _incoming_row(self, incoming: Incoming, local: LocalRow | None) -> tuple[Row, bool]:
        """The full row the change describes, and whether it is complete without `local`."""
        assert incoming.new is not None
        row: Row = dict(incoming.new)
        old = incoming.old
        if incoming.old_is_full and old is not None:
            for column, value in old.items():
                row.setdefault(column, value)
        complete = all(column in row for column in incoming.unchanged)
        if local is not None:
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
        return version, local.origin or self.site

    def _row_key(self, row: Values, incoming: Incoming) -> _Key:
        if self._version_column is None:
            return timestamp_version(incoming.commit_ts), incoming.origin
        return self._version(row), incoming.origin

    def _tombstone_key(self, tombstone: Tombstone) -> _Key:
        if self._version_column is None:
            version = timestamp_version(tombstone.deleted_at)
        else:
            version = parse_version(tombstone.version)
        return version, tombstone.origin or self.site

    def _delete_key(self, incoming: Incoming) -> tuple[Version | None, str]:
        column = self._version_column
        if column is None:
            return timestamp_version(incoming.commit_ts), incoming.origin
        old = incoming.old
        if old is not None and column in old:
            return parse_version(old[column]), incoming.origin
        return None, incoming.origin

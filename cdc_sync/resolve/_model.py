"""The data the applier hands to a `Resolver` and the `Decision` it gets back.

All values are PostgreSQL text forms (`str`) or `None` for NULL. Every class is a slotted
dataclass, read-only by contract: a resolver or merge function must not assign to one it is
given (they are not `frozen`: a frozen dataclass's `__init__` costs five times as much, and the
applier builds several per change). Nothing here does I/O.

- `LocalRow`: the site's current row for the change's key, the commit timestamp of the
  transaction that last wrote it (`pg_xact_commit_timestamp(xmin)`, None if unknown) and the
  office that wrote it (the site's own name for local writes; an empty string is read as the
  site's name).
- `Incoming`: one source change. `new` lacks the columns that were not sent (unchanged TOAST);
  `unchanged` names them when the applier knows them (it is what tells a partial `new` from a
  complete one when there is no local row). `old` is the old row: complete when `old_is_full`
  (REPLICA IDENTITY FULL), else the key columns or None. `key` identifies the site row the change
  targets (the old key for an update that changes the key). For a delete without REPLICA
  IDENTITY FULL, `old` holds only the replica-identity (key) columns, never NULLs for the rest.
  `commit_ts` is the source transaction's commit time, `origin` the office whose stream the
  change comes from. `identity_full` says whether the table's REPLICA IDENTITY is FULL (the same
  at every office); None infers it from `old_is_full`, which an insert never has, so the
  applier should set it.
- `Tombstone`: a row with this key was deleted at `deleted_at` (the deleting transaction's
  commit time) by `origin` ("" = a local delete at this site, recorded by the site's trigger);
  `version` is the deleted row's version-column text when known (else None).
- `Clocks` (per-column merge, `merge_columns`): per column, the (commit time, office) of the
  write that set its value (office "" = this site). `LocalRow.clocks` are the row's,
  `Tombstone.clocks` and `Tombstone.values` the deleted row's cells, kept so that a later write
  brings the row back with every column's latest value; None: not tracked.
- `Decision`: what to do. `write`: make the site row equal to `row` (insert or update; `row`
  holds every column to set, key columns included). `delete`: delete the site row if there is
  one and record `tombstone` (always set for `delete`, None otherwise). `skip`: leave the site
  as it is. `clocks` (per-column merge only): the key's column clocks once the decision is
  applied (of the row for `write`; a `delete`'s tombstone carries its own). `conflict` is
  one of `CONFLICT_KINDS` or None; `outcome` one of `OUTCOMES`.
- `Resolver`: `resolve(local, incoming, tombstone) -> Decision`, and `needs_local_rows`: False
  when decisions never depend on local rows or tombstones (pure `source_wins` without
  counters), so the applier may skip fetching them (and the conflict log) on a fast path.

Within a batch the applier resolves changes in order; after each decision the next change to
the same key must see the state that decision produced: `Decision.local_after` and
`Decision.tombstone_after` compute it (a written row is dated by the incoming change and
origin, except a `local_wins` write, which only moved counters and keeps the local row's key).
How states and changes are ordered is in `_policies`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from cdc_sync.changes import Op

__all__ = [
    "CONFLICT_KINDS",
    "Clock",
    "Clocks",
    "OUTCOMES",
    "Action",
    "Decision",
    "Incoming",
    "LocalRow",
    "Resolver",
    "Tombstone",
    "Values",
]

Values = Mapping[str, str | None]
Action = Literal["write", "delete", "skip"]
Clock = tuple[datetime, str]  # (commit time, office; "" = this site)
Clocks = Mapping[str, Clock]

CONFLICT_KINDS: tuple[str, ...] = (
    "insert_insert",   # incoming insert, a local row exists
    "update_update",   # incoming update, the local row is not what the change expected
    "update_missing",  # incoming update, no local row and no tombstone
    "update_delete",   # incoming update, the row was deleted here (tombstone)
    "delete_update",   # incoming delete, the local row is newer / not what it expected
    "delete_missing",  # incoming delete, no local row
    "insert_deleted",  # incoming insert, the tombstone is newer
)
OUTCOMES: tuple[str, ...] = (
    "applied",        # no conflict, the change was applied
    "incoming_wins",  # conflict, the incoming change was applied
    "local_wins",     # conflict, the site's state was kept (counters may still have moved)
    "merged",         # the merge function's row was written
    "deleted",        # conflict, the row was deleted
    "kept_deleted",   # conflict, the row stays deleted
)


@dataclass(slots=True)
class LocalRow:
    """The site's current row for a key (text values), who wrote it last and when."""

    values: Values
    commit_ts: datetime | None
    origin: str
    clocks: Clocks | None = None  # per-column merge: who set each column, when


@dataclass(slots=True)
class Incoming:
    """One source row change as the resolver sees it (insert, update or delete)."""

    op: Op
    new: Values | None
    old: Values | None
    old_is_full: bool
    commit_ts: datetime
    origin: str
    key: Values
    unchanged: frozenset[str] = frozenset()  # columns not sent in `new` (unchanged TOAST)
    # The table's REPLICA IDENTITY is FULL (deletes carry the whole old row; it is the same at
    # every office). None: inferred from `old_is_full`, which an insert never has.
    identity_full: bool | None = None

    @property
    def deletes_full(self) -> bool:
        """Whether this table's deletes travel with the full old row (`identity_full`, else
        `old_is_full`)."""
        return self.old_is_full if self.identity_full is None else self.identity_full


@dataclass(slots=True)
class Tombstone:
    """A row with this key was deleted: when, by whom, and the deleted row's version."""

    deleted_at: datetime
    version: str | None
    origin: str
    values: Values | None = None  # per-column merge: the deleted row's cells (text values)
    clocks: Clocks | None = None


@dataclass(slots=True)
class Decision:
    """What the applier does for one change; see the module docstring."""

    action: Action
    row: Values | None
    conflict: str | None
    outcome: str
    tombstone: Tombstone | None = None  # to record, for action "delete"
    clocks: Clocks | None = None  # per-column merge: the row's column clocks after a write

    def local_after(self, previous: LocalRow | None, incoming: Incoming) -> LocalRow | None:
        """The site row once this decision is applied (as the applier's write will read back:
        committed at the incoming commit time, by the incoming origin)."""
        if self.action == "write":
            assert self.row is not None
            if self.outcome == "local_wins" and previous is not None:
                # The site row won and only took counter deltas: it keeps its own key.
                return LocalRow(self.row, previous.commit_ts, previous.origin,
                                self.clocks if self.clocks is not None else previous.clocks)
            return LocalRow(self.row, incoming.commit_ts, incoming.origin, self.clocks)
        if self.action == "delete":
            return None
        return previous

    def tombstone_after(self, previous: Tombstone | None) -> Tombstone | None:
        """The key's tombstone once this decision is applied."""
        if self.action == "delete":
            return self.tombstone
        return previous


class Resolver(Protocol):
    """A table's conflict policy, bound to one site."""

    @property
    def needs_local_rows(self) -> bool:
        """False when `resolve` ignores `local` and `tombstone` apart from the conflict log."""
        ...

    def resolve(self, local: LocalRow | None, incoming: Incoming,
                tombstone: Tombstone | None) -> Decision:
        """Decide one change given the site's row and tombstone for its key."""
        ...

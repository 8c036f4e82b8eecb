"""The conflict-resolving apply path: one read and one write round trip per table per chunk.

`apply_resolved(ctx, cur, st, changes, begin, resolver)` applies `changes` — changes of one
keyed table with a unique index on its key at the site, in source order, inserts, updates and
deletes mixed, the same key any number of times — through the table's `Resolver`:

1. Read, one pipelined round trip: the site's rows for every key the changes touch (the old
   and the new key of an update), locked FOR UPDATE in key order, with the commit time and
   replication origin of the transaction that last wrote each (when the site tracks commit
   timestamps); then their tombstones (read after the rows are locked, so a local delete that
   committed while we waited is seen as its tombstone).
2. Decide in Python, change by change in order: each change sees the state the decisions
   before it left for its key (`Decision.local_after` / `tombstone_after`). Plain inserts and
   updates are decided here without the resolver (`_plain_successors`).
3. Write the net effect, one pipelined round trip: keys that end with a row we saw are
   upserted, keys that end with a row we did not see are inserted only if still absent, keys
   whose row we saw and that end without one are deleted; tombstones that changed are written
   or removed; every conflict goes into `cdc_sync.conflicts` in one statement.

Commit-time LWW records each written row's source time in `cdc_sync.row_versions`
(`needs_row_versions`) only while another source applies into the site: the first read of a
target transaction also takes the source registry's lock shared and reads
`cdc_sync.sources` (`_locks`), once per target transaction (`ResolveContext.shared_site`).

A local writer can insert a key we saw absent before our insert reaches it: the insert then
finds the row (`ON CONFLICT DO NOTHING`), and the changes of exactly those keys are decided
again from the start, now that the row exists and is locked (their earlier conflict-log rows
and tombstone writes are undone first). Other replicators cannot interleave with us: every
target transaction holds its key buckets (`_locks`) before it writes.

Nothing here imports the site writer: what it needs of it is `ResolveContext`. A user merge
function that raises becomes `UserCodeError`, which the applier dead-letters.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql

from ..changes import UNCHANGED_TOAST, Change, Op, Table, TxBegin
from ..protocol import ReplicaIdentity
from ..resolve import Clocks, Decision, Incoming, LocalRow, PolicyResolver, Resolver, Tombstone
from . import _sql
from ._arrays import pack_columns, transpose
from ._locks import REGISTRY_SHARED_SQL, SOURCES_SQL
from ._rows import as_dict, key_dict, key_values
from ._sql import SiteTable, rows_from

__all__ = ["ORIGIN_PREFIX", "ResolveContext", "UserCodeError", "apply_resolved",
           "origin_name", "origin_source", "resolved_keys"]

ORIGIN_PREFIX = "cdc_sync:"
Key = tuple[Any, ...]
Row = dict[str, str | None]


def origin_name(source: str, site: str) -> str:
    """The replication origin tagging writes of `source`'s replicator at `site`."""
    return f"{ORIGIN_PREFIX}{source}:{site}"[:512]


def origin_source(roname: str | None, local: str) -> str:
    """The office that wrote a row: the source named in our origin, else this site."""
    if roname and roname.startswith(ORIGIN_PREFIX):
        return roname[len(ORIGIN_PREFIX):].rsplit(":", 1)[0]
    return roname or local


class UserCodeError(Exception):
    """A merge function raised: the change is dead-lettered with its message."""

    _cdc_user_error = True


class ResolveContext(Protocol):
    """What the resolving path needs of the site writer."""

    source: str

    @property
    def site_name(self) -> str: ...

    @property
    def track_commit_ts(self) -> bool: ...

    def begin_for(self, change: Change, default: TxBegin | None) -> TxBegin | None: ...

    def origin_names(self, cur: psycopg.Cursor[Any], idents: set[int]) -> dict[int, str]: ...

    # Whether the site has the source registry (`cdc_sync.sources`), and whether a source
    # other than ours applies into it as the open target transaction read it (None: not read
    # yet; the writer forgets it at commit and rollback).
    registry: bool
    shared_site: bool | None


# JSON for the bookkeeping tables travels as text (cast on the site): psycopg's dumping of
# jsonb arrays cost a third of this path's client time.
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_string = json.encoder.encode_basestring  # what _json uses (the C one)


def _keys_json(names: Sequence[str], keys: Sequence[Key]) -> list[str]:
    """Each key as `_json` of `{name: value}` (text values or None), built from the encoded
    names once: the same text, a few times faster."""
    if len(names) == 1:
        head = "{" + _string(names[0]) + ":"
        return [head + ("null" if v is None else _string(v)) + "}" for (v,) in keys]
    heads = [_string(n) + ":" for n in names]
    return ["{" + ",".join([h + ("null" if v is None else _string(v))
                            for h, v in zip(heads, k, strict=True)]) + "}" for k in keys]


def _json_or_null(value: Row | None) -> str | None:
    return None if value is None else _json(value)


def resolved_keys(st: SiteTable, changes: Sequence[Change]) -> list[Key]:
    """Every key `changes` touch on the site: the key before each change, and the new key of
    an update that changes it (for the bucket locks and the read)."""
    key = st.key
    out: list[Key] = []
    for ch in changes:
        before = key_values(ch, key)
        out.append(before)
        if ch.op is Op.UPDATE and ch.old is not None and ch.new is not None:
            after = tuple(ch.new[i] for i in key)
            if after != before:
                out.append(after)
    return out


@functools.lru_cache(maxsize=256)
def _local_rows_sql(st: SiteTable, with_ts: bool, versions: bool, packed: bool = False) -> str:
    """Rows of the given keys, locked, with (commit time, origin id, origin name) of their
    writer. With `versions` the key's `cdc_sync.row_versions` entry, when it describes the row
    version found (same xmin), comes as a last column `[time, office]` (else NULL), one more
    parameter (the keys as JSON text) follows the key columns, and the table name comes before
    them."""
    keys = [sql.Identifier(f"k{j}") for j in range(len(st.key))]
    cols = sql.SQL(", ").join(sql.SQL("t.{}::text").format(st.col(i))
                              for i in range(len(st.table.columns)))
    # In the select list, not a lateral function scan: after waiting for a row lock, the
    # re-checked (newer) row version must get its own writer's time and origin.
    meta: sql.Composable = (sql.SQL("pg_xact_commit_timestamp(t.xmin), "
                    "(pg_xact_commit_timestamp_origin(t.xmin)).roident, NULL::text")
            if with_ts else sql.SQL("NULL::timestamptz, NULL::oid, NULL::text"))
    rows = rows_from(keys, packed)
    if versions and with_ts:
        # A scalar subquery (one index lookup per row), not a join: on a table without
        # statistics yet the planner hashed all of row_versions for every read. Time and
        # office come back together as a JSON array (one lookup, not two).
        meta = sql.SQL(
            "pg_xact_commit_timestamp(t.xmin), (pg_xact_commit_timestamp_origin(t.xmin)).roident, "
            "(SELECT jsonb_build_array(rv.commit_ts, rv.origin) FROM cdc_sync.row_versions AS rv "
            "WHERE rv.table_name = %s AND rv.key = v.kj::jsonb AND rv.xid = t.xmin::text::bigint)")
        rows = rows_from([*keys, sql.Identifier("kj")], packed)
    # FOR UPDATE: a local write that commits between this read and our write must not be
    # overwritten unseen; it waits for us instead and then wins or loses on its own time.
    return sql.SQL(
        "SELECT {kcols}, {cols}, {meta} FROM {t} AS t JOIN {rows} ON {where} "
        "ORDER BY {order} FOR UPDATE OF t"
    ).format(
        order=sql.SQL(", ").join(sql.SQL("t.{}").format(st.col(i)) for i in st.key),
        kcols=sql.SQL(", ").join(sql.SQL("v.{}").format(k) for k in keys), cols=cols, meta=meta,
        t=st.ident, rows=rows,
        where=sql.SQL(" AND ").join(
            sql.SQL("t.{c} = v.{a}::{ty}").format(c=st.col(i), a=a, ty=st.typ(i))
            for a, i in zip(keys, st.key, strict=True)),
    ).as_string(None)


@functools.lru_cache(maxsize=1024)
def _statement(kind: str, st: SiteTable, cols: tuple[int, ...], packed: bool = False) -> str:
    """The text of a write statement of `_sql` for `st` (composed once per table shape)."""
    if kind == "insert_absent":
        return _sql.insert_absent_sql(st, cols, packed).as_string(None)
    if kind == "upsert":
        return _sql.insert_sql(st, cols, True, packed).as_string(None)
    assert kind == "delete", kind
    return _sql.delete_sql(st, packed).as_string(None)


def _columns_param(columns: list[list[Any]]) -> tuple[list[Any], bool]:
    """Column parameters packed when every column can be (`_arrays`), else binary arrays;
    and whether they are packed."""
    packed = pack_columns(columns)
    return (list(packed), True) if packed is not None else (list(columns), False)


def _tombstones_sql(with_ts: bool) -> str:
    # A tombstone left by a local delete (source NULL, written by the trigger) is dated by the
    # commit of the deleting transaction when commit timestamps are tracked: the trigger only
    # knows the time of the DELETE statement, which may precede a concurrent write it beat.
    when = ("COALESCE(CASE WHEN source IS NULL THEN pg_xact_commit_timestamp(xmin) END, "
            "deleted_at)" if with_ts else "deleted_at")
    return (f"SELECT key, {when}, version, source, row_values "  # noqa: S608
            "FROM cdc_sync.tombstones WHERE table_name = %s AND key = ANY(%b::text[]::jsonb[])")


def _clocks_sql(with_ts: bool) -> str:
    # Local writes (recorded by the site's trigger with their xid) are dated by the commit of
    # that transaction, as the other offices read it in the stream; the trigger's clock time
    # stands in where commit timestamps are not tracked (or no longer known).
    local = ("COALESCE(pg_xact_commit_timestamp(xid((e.value->>'x')::xid8)), "
             "(e.value->>'t')::timestamptz)" if with_ts else "(e.value->>'t')::timestamptz")
    return ("SELECT cv.key, (SELECT jsonb_object_agg(e.key, CASE WHEN e.value ? 'x' THEN "  # noqa: S608
            f"jsonb_build_array({local}, '') ELSE jsonb_build_array(e.value->'t', e.value->'o') "
            "END) FROM jsonb_each(cv.clocks) AS e) FROM cdc_sync.column_versions AS cv "
            "WHERE cv.table_name = %s AND cv.key = ANY(%b::text[]::jsonb[])")


_CLOCKS_UPSERT = (
    "INSERT INTO cdc_sync.column_versions (table_name, key, clocks) "
    "SELECT %s, k::jsonb, c::jsonb FROM unnest(%b::text[], %b::text[]) AS u(k, c) "
    "ON CONFLICT (table_name, key) DO UPDATE "
    "SET clocks = cdc_sync.column_versions.clocks || EXCLUDED.clocks")


def _clocks(raw: Any) -> Clocks:
    """Clocks as `_clocks_sql` returns them: column -> [ISO time, office]."""
    if not raw:
        return {}
    return {c: (datetime.fromisoformat(v[0]), v[1] or "") for c, v in raw.items()
            if v and v[0] is not None}


_TOMBSTONE_UPSERT = (
    "INSERT INTO cdc_sync.tombstones (table_name, key, deleted_at, version, source, lsn, "
    "row_values) SELECT %s, k::jsonb, d, v, s, l::pg_lsn, r::jsonb FROM unnest(%b::text[], "
    "%b::timestamptz[], %b::text[], %b::text[], %b::text[], %b::text[]) AS u(k, d, v, s, l, r) "
    "ON CONFLICT (table_name, key) DO UPDATE SET deleted_at = EXCLUDED.deleted_at, "
    "version = EXCLUDED.version, source = EXCLUDED.source, lsn = EXCLUDED.lsn, "
    "row_values = EXCLUDED.row_values")
_TOMBSTONE_DELETE = ("DELETE FROM cdc_sync.tombstones WHERE table_name = %s "
                     "AND key = ANY(%b::text[]::jsonb[])")
_CONFLICTS_INSERT = (
    "INSERT INTO cdc_sync.conflicts (source, table_name, kind, key, local_row, incoming_row, "
    "strategy, outcome, lsn, commit_ts) "
    "SELECT %s, %s, k, j::jsonb, lr::jsonb, ir::jsonb, %s, o, l::pg_lsn, c FROM unnest("
    "%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[]) "
    "WITH ORDINALITY AS u(k, j, lr, ir, o, l, c, n) ORDER BY n")


@dataclass
class _State:
    """The site's state of the keys of one call, as the decisions so far leave it."""

    seen: dict[Key, LocalRow]             # rows as read (present on the site when we looked)
    tombs_read: dict[Key, Tombstone]
    key_json: dict[Key, str]              # every key of the call as a JSON object (text)
    clocks_read: dict[Key, Clocks] = field(default_factory=dict)  # merge_columns only
    rows: dict[Key, LocalRow | None] = field(default_factory=dict)
    tombs: dict[Key, Tombstone | None] = field(default_factory=dict)
    tomb_lsn: dict[Key, str | None] = field(default_factory=dict)
    written: dict[Key, None] = field(default_factory=dict)  # keys whose row a decision set
    tomb_changed: dict[Key, None] = field(default_factory=dict)

    def row(self, k: Key) -> LocalRow | None:
        return self.rows[k] if k in self.rows else self.seen.get(k)

    def tomb(self, k: Key) -> Tombstone | None:
        return self.tombs[k] if k in self.tombs else self.tombs_read.get(k)


@dataclass
class _Conflict:
    key: Key
    kind: str
    local: Row | None
    incoming: Row | None
    outcome: str
    begin: TxBegin | None


def apply_resolved(ctx: ResolveContext, cur: psycopg.Cursor[Any], st: SiteTable,
                   changes: Sequence[Change], begin: TxBegin | None, resolver: Resolver,
                   first: Sequence[tuple[str, Sequence[Any]]] = ()) -> tuple[int, int]:
    """Apply `changes` of `st` through `resolver`; return (changes applied, conflicts logged).

    `first`: statements (query, parameters) to send ahead of the read, in its round trip (the
    target transaction's bucket locks)."""
    table = st.table
    conn = cur.connection
    keys = list(dict.fromkeys(resolved_keys(st, changes)))
    names = table.key_columns if st.key == table.key else tuple(table.columns[i] for i in st.key)
    with_ts = ctx.track_commit_ts
    versions = with_ts and needs_row_versions(resolver)
    key_json = _keys_json(names, keys)
    columns = bool(getattr(resolver, "merge_columns", False))
    # Row versions are written only while another source applies into the site (module
    # docstring); the target transaction reads that once, under the registry lock.
    probe = versions and ctx.registry and ctx.shared_site is None
    with conn.cursor() as tcur, conn.cursor() as ccur, conn.cursor() as scur:
        with conn.pipeline():
            for query, params in first:
                cur.execute(query, params)
            if probe:
                scur.execute(REGISTRY_SHARED_SQL)
                scur.execute(SOURCES_SQL, (ctx.source,))
            if versions:
                params, packed = _columns_param([*transpose(keys), key_json])
                cur.execute(_local_rows_sql(st, with_ts, True, packed),
                            [table.qualified, *params])
            else:
                params, packed = _columns_param(transpose(keys))
                cur.execute(_local_rows_sql(st, with_ts, False, packed), params)
            tcur.execute(_tombstones_sql(with_ts), (table.qualified, key_json))
            if columns:
                ccur.execute(_clocks_sql(with_ts), (table.qualified, key_json))
        fetched = cur.fetchall()
        tomb_rows = tcur.fetchall()
        clock_rows = ccur.fetchall() if columns else []
        if probe:
            shared = scur.fetchone()
            ctx.shared_site = bool(shared and shared[0])
    nk, nc = len(st.key), len(table.columns)
    idents = {r[-2] for r in fetched if r[-2]}  # (0: written locally, no origin)
    origins = ctx.origin_names(cur, idents) if idents else {}
    site = ctx.site_name
    clocks_read = {tuple(k.get(n) for n in names): _clocks(c) for k, c in clock_rows}
    seen: dict[Key, LocalRow] = {}
    for r in fetched:
        values = dict(zip(table.columns, r[nk:nk + nc], strict=True))
        ts, roident, recorded = r[-3], r[-2], r[-1]
        if recorded is not None:  # [source commit time, office] from row_versions
            ts, origin = datetime.fromisoformat(recorded[0]), recorded[1]
        else:
            origin = origin_source(origins.get(roident), site) if roident else site
        k = tuple(r[:nk])
        seen[k] = LocalRow(values, ts, origin, clocks_read.get(k, {}) if columns else None)
    tombs_read: dict[Key, Tombstone] = {}
    for k, deleted_at, version, source, row_values in tomb_rows:
        key = tuple(k.get(n) for n in names)
        tombs_read[key] = Tombstone(deleted_at, version, source or "", row_values,
                                    clocks_read.get(key, {}) if columns else None)
    state = _State(seen, tombs_read, dict(zip(keys, key_json, strict=True)), clocks_read)
    conflicts = _decide(ctx, state, st, changes, begin, resolver)
    strategy = str(getattr(resolver, "strategy", ""))
    raced = _write(ctx, cur, st, state, conflicts, strategy,
                   versions and (ctx.shared_site or not ctx.registry))
    if raced:
        # Nothing of the raced keys was written (rows, tombstones, conflicts): decide their
        # changes again, now that their rows exist and we hold them.
        again = [ch for ch in changes if _touches(st, ch, raced)]
        _applied, more = apply_resolved(ctx, cur, st, again, begin, resolver)
        return len(changes), len(conflicts) - _dropped(conflicts, raced) + more
    return len(changes), len(conflicts)


def _touches(st: SiteTable, ch: Change, keys: set[Key]) -> bool:
    return any(k in keys for k in resolved_keys(st, (ch,)))


def _dropped(conflicts: list[_Conflict], raced: set[Key]) -> int:
    return sum(1 for c in conflicts if c.key in raced)


def _decide(ctx: ResolveContext, state: _State, st: SiteTable, changes: Sequence[Change],
            begin: TxBegin | None, resolver: Resolver) -> list[_Conflict]:
    table = st.table
    key = st.key
    full = table.replica_identity is ReplicaIdentity.FULL
    fallback_ts = begin.commit_ts if begin else datetime.now().astimezone()
    conflicts: list[_Conflict] = []
    source = ctx.source
    fast, by_time = _plain_successors(resolver)
    ncols = len(table.columns)
    for ch in changes:
        ch_begin = ctx.begin_for(ch, begin)
        commit_ts = ch_begin.commit_ts if ch_begin else fallback_ts
        before = key_values(ch, key)
        new = ch.new
        if fast and new is not None and (ch.old is None or (ch.old_is_key and not full)):
            # The plain cases, decided here as the policy would (`_plain_successors`): an
            # insert of a key with neither row nor tombstone, and an update of a row it
            # plainly follows, keeping its key. No conflict: the incoming row is written.
            op = ch.op
            here = state.row(before)
            if op is Op.INSERT:
                plain = here is None and state.tomb(before) is None
            else:
                plain = (op is Op.UPDATE and here is not None
                         and (here.origin == source
                              or (by_time and here.commit_ts is not None
                                  and commit_ts > here.commit_ts))
                         and (ch.old is None or tuple([new[i] for i in key]) == before))
            if plain:
                row = as_dict(table, new)
                assert row is not None
                if here is not None and len(row) < ncols:  # unchanged TOAST: the site's value
                    for column, value in here.values.items():
                        row.setdefault(column, value)
                state.rows[before] = LocalRow(row, commit_ts, source)
                state.written[before] = None
                if here is not None and state.tomb(before) is not None:
                    state.tombs[before] = None
                    state.tomb_changed[before] = None
                continue
        unchanged = (frozenset(table.columns[i] for i, v in enumerate(new)
                               if v is UNCHANGED_TOAST)
                     if new is not None and UNCHANGED_TOAST in new else frozenset())
        old_is_full = full and ch.old is not None and not ch.old_is_key
        incoming = Incoming(
            op=ch.op, new=as_dict(table, new),
            # A key-only old tuple carries NULL for every other column: those NULLs are not
            # values, so only the replica-identity columns are passed on.
            old=as_dict(table, ch.old, only=table.key if ch.old_is_key else None),
            old_is_full=old_is_full, commit_ts=commit_ts, origin=source,
            key=key_dict(table, key, before), unchanged=unchanged, identity_full=full,
        )
        here = state.row(before)
        tomb = state.tomb(before)
        try:
            decision = resolver.resolve(here, incoming, tomb)
        except Exception as exc:
            raise UserCodeError(f"conflict resolution failed: {exc}") from exc
        if decision.conflict:
            conflicts.append(_Conflict(
                before, decision.conflict, dict(here.values) if here else None,
                _incoming_json(table, ch), decision.outcome, ch_begin))
        _apply_decision(state, st, ch, before, decision, incoming, ch_begin)
    return conflicts


def _plain_successors(resolver: Resolver) -> tuple[bool, bool]:
    """Whether `_decide` may decide plain inserts and updates itself, and whether a later
    commit time makes an update plain (commit-time ordering), for `resolver`.

    Only for the built-in policies without per-column merge; for them (`_policies`) an insert
    meeting neither row nor tombstone is written as is, and an update without a full old row
    (no values to compare, no counter deltas) meeting a row it succeeds — the same office
    wrote that row, or, ordering by commit time, it committed later — is written with no
    conflict whatever the strategy (`tests/sinks/test_plain_successors.py` checks the two
    agree)."""
    if type(resolver) is not PolicyResolver or resolver.merge_columns:
        return False, False
    return True, resolver.version_column is None


def _incoming_json(table: Table, ch: Change) -> Row | None:
    return as_dict(table, ch.new if ch.op is not Op.DELETE else ch.old)


def _apply_decision(state: _State, st: SiteTable, ch: Change, before: Key, decision: Decision,
                    incoming: Incoming, ch_begin: TxBegin | None) -> None:
    if decision.action == "write":
        assert decision.row is not None
        after = before
        if ch.op is Op.UPDATE and ch.new is not None:
            after = tuple(ch.new[i] for i in st.key)
        if after != before:
            state.rows[before] = None
            state.written[before] = None
        state.rows[after] = decision.local_after(state.row(after), incoming)
        state.written[after] = None
        for k in {before, after}:
            if state.tomb(k) is not None:  # a row written again: its tombstone goes
                state.tombs[k] = None
                state.tomb_changed[k] = None
    elif decision.action == "delete":
        state.rows[before] = None
        state.written[before] = None
        state.tombs[before] = decision.tombstone_after(state.tomb(before))
        state.tomb_lsn[before] = str(ch_begin.commit_lsn) if ch_begin and ch_begin.commit_lsn \
            else None
        state.tomb_changed[before] = None


def _write(ctx: ResolveContext, cur: psycopg.Cursor[Any], st: SiteTable, state: _State,
           conflicts: list[_Conflict], strategy: str, versions: bool) -> set[Key]:
    """Write the net effect of the decisions (module docstring, step 3); return the keys a
    concurrent local insert got to first (nothing of theirs was written, conflicts and
    tombstone changes included)."""
    table = st.table
    conn = cur.connection
    index = {c: i for i, c in enumerate(table.columns)}
    upserts: dict[tuple[int, ...], list[Row]] = {}
    fresh: dict[tuple[int, ...], list[tuple[Key, Row]]] = {}
    deletes: list[Key] = []
    for k in state.written:
        final = state.rows.get(k)
        if final is None:
            if k in state.seen:
                deletes.append(k)
            continue
        row = dict(final.values)
        cols = tuple(sorted(index[c] for c in row if c in index))
        if k in state.seen:
            upserts.setdefault(cols, []).append(row)
        else:
            fresh.setdefault(cols, []).append((k, row))
    fresh_keys = {k for group in fresh.values() for k, _r in group}
    raced: set[Key] = set()
    # Fresh rows first, on their own: which of them a local insert beat decides what else of
    # theirs is written. Usually there is no race, and this is part of the one round trip.
    with conn.pipeline():
        fresh_curs: list[tuple[psycopg.Cursor[Any], list[tuple[Key, Row]]]] = []
        for cols, group in fresh.items():
            fc = conn.cursor()
            params, packed = _columns_param(
                [[r[table.columns[i]] for _k, r in group] for i in cols])
            fc.execute(_statement("insert_absent", st, cols, packed), params)
            fresh_curs.append((fc, group))
        if deletes:
            params, packed = _columns_param(transpose(deletes))
            cur.execute(_statement("delete", st, (), packed), params)
        for cols, rows in upserts.items():
            params, packed = _columns_param([[r[table.columns[i]] for r in rows] for i in cols])
            cur.execute(_statement("upsert", st, cols, packed), params)
        if not fresh_keys:
            _write_bookkeeping(ctx, cur, st, state, conflicts, set(), strategy)
            if versions:
                _write_versions(cur, st, state, set())
    for fc, group in fresh_curs:
        inserted = {tuple(r) for r in fc.fetchall()}
        fc.close()
        raced.update(k for k, _r in group if k not in inserted)
    if fresh_keys:
        with conn.pipeline():
            _write_bookkeeping(ctx, cur, st, state, conflicts, raced, strategy)
            if versions:
                _write_versions(cur, st, state, raced)
    return raced


def needs_row_versions(resolver: Resolver) -> bool:
    """Whether the policy orders writes by commit time (no version column), so that rows
    written in a target transaction holding several source transactions need their own time
    in `cdc_sync.row_versions`."""
    return (getattr(resolver, "version_column", None) is None
            and getattr(resolver, "strategy", "") != "source_wins")


@functools.lru_cache(maxsize=256)
def _versions_sql(st: SiteTable) -> str:
    """Record (xmin, time, office) of the rows just written, read back in the same statement:
    their xmin is that of our (sub)transaction."""
    keys = [sql.Identifier(f"k{j}") for j in range(len(st.key))]
    extra = [sql.Identifier(n) for n in ("kj", "c", "o")]
    return sql.SQL(
        "INSERT INTO cdc_sync.row_versions (table_name, key, xid, commit_ts, origin) "
        "SELECT %s, v.kj::jsonb, t.xmin::text::bigint, v.c::timestamptz, v.o "
        "FROM {t} AS t JOIN {rows} ON {where} "
        "ON CONFLICT (table_name, key) DO UPDATE SET xid = EXCLUDED.xid, "
        "commit_ts = EXCLUDED.commit_ts, origin = EXCLUDED.origin"
    ).format(
        t=st.ident, rows=rows_from([*keys, *extra]),
        where=sql.SQL(" AND ").join(
            sql.SQL("t.{c} = v.{a}::{ty}").format(c=st.col(i), a=a, ty=st.typ(i))
            for a, i in zip(keys, st.key, strict=True)),
    ).as_string(None)


_VERSIONS_DELETE = ("DELETE FROM cdc_sync.row_versions WHERE table_name = %s "
                    "AND key = ANY(%b::text[]::jsonb[])")


def _write_versions(cur: psycopg.Cursor[Any], st: SiteTable, state: _State,
                    raced: set[Key]) -> None:
    """`cdc_sync.row_versions` of the keys written (see `needs_row_versions`)."""
    put: list[tuple[Key, LocalRow]] = []
    gone: list[Key] = []
    for k in state.written:
        if k in raced:
            continue
        final = state.rows.get(k)
        if final is None:
            gone.append(k)
        elif final.commit_ts is not None:
            put.append((k, final))
    js = state.key_json
    if put:
        cur.execute(_versions_sql(st), [
            st.table.qualified, *transpose([k for k, _r in put]), [js[k] for k, _r in put],
            [r.commit_ts.isoformat() for _k, r in put if r.commit_ts is not None],
            [r.origin for _k, r in put]])
    if gone:
        cur.execute(_VERSIONS_DELETE, (st.table.qualified, [js[k] for k in gone]))


def _clocks_to_write(state: _State, raced: set[Key]) -> list[tuple[Key, dict[str, Any]]]:
    """merge_columns: per key whose column clocks changed, the entries that changed (merged
    into the stored ones: a local write's entry for another column, recorded by its trigger
    while we worked, stays)."""
    out: list[tuple[Key, dict[str, Any]]] = []
    for k in dict.fromkeys([*state.written, *state.tomb_changed]):
        if k in raced:
            continue
        row = state.row(k)
        final = row.clocks if row is not None else None
        if final is None:
            tomb = state.tomb(k)
            final = tomb.clocks if tomb is not None else None
        if not final:
            continue
        before = state.clocks_read.get(k, {})
        changed = {c: {"t": ts.isoformat(), "o": o} for c, (ts, o) in final.items()
                   if before.get(c) != (ts, o)}
        if changed:
            out.append((k, changed))
    return out


def _write_bookkeeping(ctx: ResolveContext, cur: psycopg.Cursor[Any], st: SiteTable,
                       state: _State, conflicts: list[_Conflict], raced: set[Key],
                       strategy: str) -> None:
    """Tombstones and the conflict log of every key but `raced`."""
    table = st.table
    put: list[tuple[Key, Tombstone, str | None]] = []
    drop: list[Key] = []
    for k in state.tomb_changed:
        if k in raced:
            continue
        final = state.tomb(k)
        if final is not None:
            if final is not state.tombs_read.get(k):
                put.append((k, final, state.tomb_lsn.get(k)))
        elif k in state.tombs_read:
            drop.append(k)

    js = state.key_json.__getitem__

    if put:
        cur.execute(_TOMBSTONE_UPSERT, (
            table.qualified, [js(k) for k, _t, _l in put], [t.deleted_at for _k, t, _l in put],
            [t.version for _k, t, _l in put], [t.origin or None for _k, t, _l in put],
            [lsn for _k, _t, lsn in put],
            [_json_or_null(dict(t.values)) if t.values is not None else None
             for _k, t, _l in put]))
    clocks = _clocks_to_write(state, raced)
    if clocks:
        cur.execute(_CLOCKS_UPSERT, (table.qualified, [js(k) for k, _c in clocks],
                                     [_json(c) for _k, c in clocks]))
    if drop:
        cur.execute(_TOMBSTONE_DELETE, (table.qualified, [js(k) for k in drop]))
    logged = [c for c in conflicts if c.key not in raced]
    if logged:
        cur.execute(_CONFLICTS_INSERT, (
            ctx.source, table.qualified, strategy, [c.kind for c in logged],
            [js(c.key) for c in logged], [_json_or_null(c.local) for c in logged],
            [_json_or_null(c.incoming) for c in logged], [c.outcome for c in logged],
            [str(c.begin.commit_lsn) if c.begin else None for c in logged],
            [c.begin.commit_ts if c.begin else None for c in logged]))


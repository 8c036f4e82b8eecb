"""The conflict-resolving apply path: fetch local rows and tombstones, decide, write set-based.

For one run (one table, one operation, distinct keys; see `_plan`) on a table whose policy
needs the local rows: one query fetches the site's rows for every key of the run with the
commit time and origin of the transaction that last wrote each; one query fetches tombstones;
the table's `Resolver` decides per change, in order; the decisions are written with one
statement per kind (upserts, deletes, tombstones, conflict-log rows).

A user merge function that raises is marked so the applier dead-letters that change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ..changes import UNCHANGED_TOAST, Change, Op, TxBegin
from ..protocol import ReplicaIdentity
from ..resolve import Incoming, LocalRow, Resolver, Tombstone
from . import _sql
from ._arrays import transpose
from ._plan import Run
from ._rows import as_dict, key_dict, key_values
from ._sql import SiteTable, rows_from

if TYPE_CHECKING:
    from .site import SiteWriter

ORIGIN_PREFIX = "cdc_sync:"


def origin_name(source: str, site: str) -> str:
    """The replication origin tagging writes of `source`'s replicator at `site`."""
    return f"{ORIGIN_PREFIX}{source}:{site}"[:512]


def origin_source(roname: str | None, local: str) -> str:
    """The office that wrote a row: the source named in our origin, else this site."""
    if roname and roname.startswith(ORIGIN_PREFIX):
        return roname[len(ORIGIN_PREFIX):].rsplit(":", 1)[0]
    return roname or local


def _local_rows_sql(st: SiteTable, with_ts: bool) -> sql.Composed:
    keys = [sql.Identifier(f"k{j}") for j in range(len(st.key))]
    cols = sql.SQL(", ").join(sql.SQL("t.{}::text").format(st.col(i))
                              for i in range(len(st.table.columns)))
    meta = (sql.SQL("pg_xact_commit_timestamp(t.xmin), (SELECT o.roname FROM "
                    "pg_replication_origin o WHERE o.roident = "
                    "(pg_xact_commit_timestamp_origin(t.xmin)).roident)")
            if with_ts else sql.SQL("NULL::timestamptz, NULL::text"))
    # FOR UPDATE: a local write that commits between this read and our write must not be
    # overwritten unseen; it waits for us instead and then wins or loses on its own time.
    # Locking in key order keeps deadlocks with local transactions rare.
    return sql.SQL(
        "SELECT {kcols}, {cols}, {meta} FROM {t} AS t JOIN {rows} "
        "ON {where} ORDER BY {order} FOR UPDATE OF t"
    ).format(
        order=sql.SQL(", ").join(sql.SQL("t.{}").format(st.col(i)) for i in st.key),
        kcols=sql.SQL(", ").join(sql.SQL("v.{}").format(k) for k in keys), cols=cols, meta=meta,
        t=st.ident, rows=rows_from(keys),
        where=sql.SQL(" AND ").join(
            sql.SQL("t.{c} = v.{a}::{ty}").format(c=st.col(i), a=a, ty=st.typ(i))
            for a, i in zip(keys, st.key, strict=True)),
    )


class UserCodeError(Exception):
    """A merge function raised: the change is dead-lettered with its message."""

    _cdc_user_error = True


def apply_resolved(writer: SiteWriter, cur: psycopg.Cursor[Any], st: SiteTable, run: Run,
                   begin: TxBegin | None, resolver: Resolver) -> tuple[int, int]:
    """Apply `run` through `resolver`; return (changes applied, conflicts logged)."""
    table = st.table
    key = st.key
    names = [table.columns[i] for i in key]
    befores = [key_values(ch, key) for ch in run.changes]
    with_ts = writer.track_commit_ts
    # Two appliers (from two offices) deciding the same key must not interleave: a row lock
    # cannot cover a key with no row, so each key's advisory lock is taken first, in order.
    cur.execute("SELECT pg_advisory_xact_lock(h) FROM unnest(%s::bigint[]) AS u(h) ORDER BY h",
                (sorted({_key_lock(table.qualified, k) for k in befores}),))
    cur.execute(_local_rows_sql(st, with_ts), transpose(befores))
    nk = len(key)
    local: dict[tuple[Any, ...], LocalRow] = {}
    for r in cur.fetchall():
        values = dict(zip(table.columns, r[nk:nk + len(table.columns)], strict=True))
        local[tuple(r[:nk])] = LocalRow(values, r[-2], origin_source(r[-1], writer.opts.site))
    tombs = _fetch_tombstones(cur, table.qualified, names, befores, with_ts)
    fallback_ts = begin.commit_ts if begin else datetime.now().astimezone()
    full = table.replica_identity is ReplicaIdentity.FULL
    writes: list[_Write] = []
    deletes: list[tuple[tuple[Any, ...], str | None, datetime, TxBegin | None]] = []
    conflicts = 0
    strategy = getattr(resolver, "strategy", "")
    version_column = getattr(resolver, "version_column", None)
    for ch, before in zip(run.changes, befores, strict=True):
        ch_begin = writer.begin_for(ch, begin)
        commit_ts = ch_begin.commit_ts if ch_begin else fallback_ts
        unchanged = frozenset(
            table.columns[i] for i, v in enumerate(ch.new) if v is UNCHANGED_TOAST
        ) if ch.new is not None and UNCHANGED_TOAST in ch.new else frozenset()
        incoming = Incoming(
            op=ch.op, new=as_dict(table, ch.new), old=as_dict(table, ch.old),
            old_is_full=full and ch.old is not None, commit_ts=commit_ts,
            origin=writer.source, key=key_dict(table, key, before), unchanged=unchanged,
        )
        here = local.get(before)
        try:
            decision = resolver.resolve(here, incoming, tombs.get(before))
        except Exception as exc:
            raise UserCodeError(f"conflict resolution failed: {exc}") from exc
        if decision.conflict:
            writer.log_conflict(cur, st, ch, begin, decision.conflict,
                                dict(here.values) if here else None, strategy, decision.outcome)
            conflicts += 1
        if decision.action == "write" and decision.row is not None:
            after = before
            if ch.op is Op.UPDATE and ch.new is not None:
                after = tuple(ch.new[i] for i in key)
            writes.append(_Write(before, after, dict(decision.row), ch,
                                 fresh=before not in local and before == after))
        elif decision.action == "delete":
            tomb = decision.tombstone
            version = tomb.version if tomb is not None else None
            if version is None and version_column:
                src = incoming.old or (here.values if here else None) or {}
                version = src.get(version_column)
            deletes.append((before, version, commit_ts, ch_begin))
    raced = _write_rows(cur, st, writes)
    if raced:
        # Rows inserted locally since we looked (our insert found them): decide again, now
        # that they exist and are locked.
        again = Run(run.op, run.table, tuple(w.change for w in raced), run.columns)
        more_applied, more_conflicts = apply_resolved(writer, cur, st, again, begin, resolver)
        conflicts += more_conflicts
        writes = [w for w in writes if w not in raced]
    else:
        more_applied = 0
    if deletes:
        # Only rows we saw (and locked FOR UPDATE): a key that was missing may have been
        # inserted locally since we looked, and that newer row must not be deleted unseen.
        present = [d[0] for d in deletes if d[0] in local]
        if present:
            cur.execute(_sql.delete_sql(st), transpose(present))
        cur.execute(
            "INSERT INTO cdc_sync.tombstones (table_name, key, deleted_at, version, source, lsn) "
            "SELECT %s, k, d, v, %s, l::pg_lsn FROM unnest(%s::jsonb[], %s::text[], "
            "%s::timestamptz[], %s::text[]) AS u(k, v, d, l) "
            "ON CONFLICT (table_name, key) DO UPDATE SET deleted_at = EXCLUDED.deleted_at, "
            "version = EXCLUDED.version, source = EXCLUDED.source, lsn = EXCLUDED.lsn",
            (table.qualified, writer.source,
             [Jsonb(dict(zip(names, d[0], strict=True))) for d in deletes],
             [d[1] for d in deletes], [d[2] for d in deletes],
             [str(d[3].commit_lsn) if d[3] else None for d in deletes]))
    revived = [w.after for w in writes if w.after in tombs or w.before in tombs]
    if revived:
        cur.execute("DELETE FROM cdc_sync.tombstones WHERE table_name = %s AND key = ANY(%s::jsonb[])",
                    (table.qualified, [Jsonb(dict(zip(names, k, strict=True))) for k in revived]))
    return len(writes) + len(deletes) + more_applied, conflicts


@dataclass(frozen=True, slots=True, eq=False)
class _Write:
    """A decided write: the row's key before and after, the row, its change, and whether we
    saw no row under that key (then it is inserted only if still absent)."""

    before: tuple[Any, ...]
    after: tuple[Any, ...]
    row: dict[str, str | None]
    change: Change
    fresh: bool


def _write_rows(cur: psycopg.Cursor[Any], st: SiteTable, writes: Sequence[_Write]) -> list[_Write]:
    """Write the decided rows; return the fresh ones a concurrent local insert got to first."""
    if not writes:
        return []
    moved = [w.before for w in writes if w.before != w.after]
    if moved:
        cur.execute(_sql.delete_sql(st), transpose(moved))
    index = {c: i for i, c in enumerate(st.table.columns)}
    groups: dict[tuple[tuple[int, ...], bool], list[_Write]] = {}
    for w in writes:
        cols = tuple(sorted(index[c] for c in w.row if c in index))
        groups.setdefault((cols, w.fresh), []).append(w)
    raced: list[_Write] = []
    for (cols, fresh), group in groups.items():
        names = [st.table.columns[i] for i in cols]
        params = [[w.row[n] for w in group] for n in names]
        if not fresh:
            cur.execute(_sql.insert_sql(st, cols, True), params)
            continue
        cur.execute(_sql.insert_absent_sql(st, cols), params)
        inserted = {tuple(r) for r in cur.fetchall()}
        raced.extend(w for w in group if w.after not in inserted)
    return raced


def _fetch_tombstones(cur: psycopg.Cursor[Any], table: str, names: list[str],
                      keys: list[tuple[Any, ...]], with_ts: bool) -> dict[tuple[Any, ...], Tombstone]:
    # A tombstone left by a local delete (source NULL, written by the trigger) is dated by the
    # commit of the deleting transaction when commit timestamps are tracked: the trigger only
    # knows the time of the DELETE statement, which may precede a concurrent write it beat.
    when = ("COALESCE(CASE WHEN source IS NULL THEN pg_xact_commit_timestamp(xmin) END, "
            "deleted_at)" if with_ts else "deleted_at")
    cur.execute(
        f"SELECT key, {when}, version, source FROM cdc_sync.tombstones "  # noqa: S608 - constant
        "WHERE table_name = %s AND key = ANY(%s::jsonb[])",
        (table, [Jsonb(dict(zip(names, k, strict=True))) for k in keys]))
    out: dict[tuple[Any, ...], Tombstone] = {}
    for k, deleted_at, version, source in cur.fetchall():
        out[tuple(k.get(n) for n in names)] = Tombstone(deleted_at, version, source or "")
    return out


def _key_lock(table: str, key: tuple[Any, ...]) -> int:
    """A stable signed 64-bit advisory-lock id for (table, key)."""
    digest = hashlib.blake2b(repr((table, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


__all__ = ["UserCodeError", "apply_resolved", "origin_name", "origin_source"]

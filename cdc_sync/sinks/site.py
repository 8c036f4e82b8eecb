"""`SiteWriter`: applies chunks of changes to one site database inside one open transaction.

Contract:
- `begin()` opens the target transaction; `apply(changes)` applies a chunk set-based (one
  statement per run, see `_plan`); `commit(lsn, ts)` writes the site's progress for `source`
  in the same transaction and commits it: rows and progress become durable together, which is
  what makes apply exactly-once. `rollback()` forgets everything since `begin()`.
- Tables are matched by the source's schema and name; the site's own column types are used for
  the casts. A source column missing on the site raises `SiteError` naming `table.column`.
- psycopg errors propagate unchanged: the caller tells connection failures from data errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg

from ..changes import Change, Op, Table
from ..errors import SiteError
from ..protocol import (
    INVALID_LSN,
    TRUNCATE_CASCADE,
    TRUNCATE_RESTART_IDENTITY,
    Lsn,
    ReplicaIdentity,
)
from . import _sql
from ._plan import Run, plan_runs, sent_columns
from ._sql import SiteTable

log = logging.getLogger(__name__)

# Session settings shared by the replication connection and every site connection, so text
# values are produced and parsed identically on both ends.
SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "
    "-c bytea_output=hex"
)

# Site sessions only: the set-based statements join a few thousand unnest() rows to the table
# on its key. The planner estimates function scans poorly and would hash-join against a scan
# of the whole table; an index nested loop is what we want, whatever the table's size.
SITE_SESSION_OPTIONS = SESSION_OPTIONS + " -c enable_hashjoin=off -c enable_mergejoin=off"

TableFilter = Callable[[Table], bool]


def connect_site(dsn: str, *, application_name: str = "cdc_sync") -> psycopg.Connection[Any]:
    """Open a site connection with our session settings (autocommit off).

    Like PostgreSQL's own apply worker, we run with `session_replication_role = replica` when
    allowed (superuser), so site triggers and foreign keys do not fire on replicated rows.
    """
    conn = psycopg.connect(
        dsn, autocommit=False, options=SITE_SESSION_OPTIONS, application_name=application_name,
        connect_timeout=10,
    )
    try:
        conn.execute("SET session_replication_role = replica")
        conn.commit()
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
    return conn


class SiteWriter:
    """One site connection and the cache of its table descriptions (see module docstring)."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        source: str,
        *,
        wants: TableFilter | None = None,
    ) -> None:
        self.conn = conn
        self.source = source
        self.wants = wants or (lambda _t: True)
        self._tables: dict[int, tuple[Table, SiteTable | None]] = {}
        self._in_tx = False

    # -- progress -------------------------------------------------------------------------
    def read_progress(self) -> tuple[Lsn, Lsn | None]:
        """(applied LSN, snapshot LSN) recorded for our source; (0/0, None) when none."""
        with self.conn.cursor() as cur:
            cur.execute(_sql.PROGRESS_SELECT, (self.source,))
            row = cur.fetchone()
        self.conn.rollback()
        if row is None:
            return INVALID_LSN, None
        return Lsn.parse(row[0]), (Lsn.parse(row[2]) if row[2] else None)

    # -- transaction ----------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def begin(self) -> None:
        self._in_tx = True

    def commit(self, lsn: Lsn, commit_ts: datetime | None) -> None:
        with self.conn.cursor() as cur:
            cur.execute(_sql.PROGRESS_UPSERT, (self.source, str(lsn), commit_ts))
        self.conn.commit()
        self._in_tx = False

    def rollback(self) -> None:
        self._in_tx = False
        try:
            self.conn.rollback()
        except psycopg.OperationalError:
            pass

    # -- apply ----------------------------------------------------------------------------
    def apply(self, changes: Sequence[Change]) -> int:
        """Apply one chunk; return the number of row changes written."""
        wanted: list[Change] = []
        keys: dict[int, tuple[int, ...]] = {}
        for ch in changes:
            if ch.op is Op.MESSAGE:
                continue
            if ch.op is Op.TRUNCATE:
                wanted.append(ch)
                continue
            assert ch.table is not None
            st = self.site_table(ch.table)
            if st is None:
                continue
            if st.key:
                keys[st.table.oid] = st.key
            wanted.append(ch)
        n = 0
        with self.conn.cursor() as cur:
            for run in plan_runs(wanted, keys):
                n += self._apply_run(cur, run)
        return n

    def _apply_run(self, cur: psycopg.Cursor[Any], run: Run) -> int:
        if run.op is Op.TRUNCATE:
            ch = run.changes[0]
            tables = [t for t in ch.truncated if self.site_table(t) is not None]
            if tables:
                cur.execute(_sql.truncate_sql(
                    tables, bool(ch.truncate_options & TRUNCATE_RESTART_IDENTITY),
                    bool(ch.truncate_options & TRUNCATE_CASCADE)))
            return len(tables)
        assert run.table is not None
        st = self.site_table(run.table)
        assert st is not None
        changes = run.changes
        if not st.key:
            return self._apply_keyless(cur, st, run)
        if run.op is Op.INSERT:
            cols = range(len(st.table.columns))
            arrays = [[c.new[i] for c in changes] for i in cols]  # type: ignore[index]
            cur.execute(_sql.insert_sql(st, cols, st.upsert), arrays)
        elif run.op is Op.UPDATE:
            key_arrays = [
                [(c.old if c.old is not None else c.new)[i] for c in changes]  # type: ignore[index]
                for i in st.key
            ]
            val_arrays = [[c.new[i] for c in changes] for i in run.columns]  # type: ignore[index]
            cur.execute(_sql.update_sql(st, run.columns), key_arrays + val_arrays)
        elif run.op is Op.DELETE:
            key_arrays = [[c.old[i] for c in changes] for i in st.key]  # type: ignore[index]
            cur.execute(_sql.delete_sql(st), key_arrays)
        return len(changes)

    def _apply_keyless(self, cur: psycopg.Cursor[Any], st: SiteTable, run: Run) -> int:
        # Keyless tables (REPLICA IDENTITY FULL, no unique key on the site): one statement per
        # row, since each must touch exactly one of possibly identical rows.
        for ch in run.changes:
            if ch.op is Op.INSERT:
                assert ch.new is not None
                every = range(len(st.table.columns))
                cur.execute(_sql.insert_sql(st, every, False), [[ch.new[i]] for i in every])
                continue
            assert ch.old is not None
            match = sent_columns(ch.old)
            old_vals = [ch.old[i] for i in match]
            if ch.op is Op.DELETE:
                cur.execute(_sql.keyless_delete_sql(st, match), old_vals)
            else:
                assert ch.new is not None
                cols = sent_columns(ch.new)
                cur.execute(_sql.keyless_update_sql(st, cols, match),
                            [ch.new[i] for i in cols] + old_vals)
        return len(run.changes)

    # -- site catalog ---------------------------------------------------------------------
    def site_table(self, table: Table) -> SiteTable | None:
        """The site's description of `table`, or None when this site does not take it."""
        cached = self._tables.get(table.oid)
        if cached is not None and cached[0] is table:
            return cached[1]
        st = self._describe(table) if self.wants(table) else None
        self._tables[table.oid] = (table, st)
        return st

    def forget_tables(self) -> None:
        self._tables.clear()

    def _describe(self, table: Table) -> SiteTable:
        with self.conn.cursor() as cur:
            cur.execute(_sql.SITE_COLUMNS, (table.schema, table.name))
            rows = cur.fetchall()
            if not rows:
                raise SiteError(f"table {table.qualified} does not exist on the site "
                                "(run `cdc-sync init`)")
            oid = rows[0][0]
            site_types = {name: typ for _oid, name, typ, _gen in rows}
            generated = {name for _oid, name, _typ, gen in rows if gen}
            cur.execute(_sql.SITE_UNIQUE_INDEXES, (oid,))
            uniques: list[tuple[bool, list[str]]] = [(r[0], r[1]) for r in cur.fetchall()]
        types: list[str] = []
        for col in table.columns:
            if col not in site_types:
                raise SiteError(f"site is missing column {table.qualified}.{col}")
            if col in generated:
                raise SiteError(f"column {table.qualified}.{col} is generated on the site")
            types.append(site_types[col])
        index = {c: i for i, c in enumerate(table.columns)}
        key: tuple[int, ...] = ()
        upsert = False
        if table.key and table.replica_identity is not ReplicaIdentity.FULL:
            key = table.key
        # A site unique index on exactly the key columns makes ON CONFLICT possible; with
        # REPLICA IDENTITY FULL the site's primary key (or any unique index) identifies rows.
        for _is_pk, cols in uniques:
            if all(c in index for c in cols):
                idx = tuple(index[c] for c in cols)
                if not key:
                    key = idx
                if set(idx) == set(key):
                    key, upsert = idx, True
                    break
        return SiteTable(table, tuple(types), key, upsert)


__all__ = ["SESSION_OPTIONS", "SiteWriter", "connect_site"]

"""Consistent initial copies: an exported snapshot of a new slot, COPY from source to site.

`exported_snapshot` creates a replication slot with `SNAPSHOT 'export'` and keeps its
connection open and idle while the snapshot is used (PostgreSQL requires that). `copy_table`
streams `COPY … TO STDOUT` on the source into `COPY … FROM STDIN` on the site, in text form,
with the same session settings on both ends, so values are reproduced exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq, sql

from ..errors import SourceError
from ..protocol import Lsn
from .catalog import TableDef
from .stream import quote_ident, replication_connect

SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


def check_slot_name(name: str) -> str:
    if not SLOT_NAME.match(name):
        raise SourceError(
            f"source: invalid slot name {name!r} (lower-case letters, digits and _; at most 63)")
    return name


def simple_query(conn: psycopg.Connection[Any], command: str) -> list[tuple[str | None, ...]]:
    """Run a replication command (simple query protocol only) and return its rows as text."""
    res = conn.pgconn.exec_(command.encode())
    if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        msg = " ".join(res.error_message.decode("utf-8", "replace").split())
        raise SourceError(f"source: {command.split(' (')[0]}: {msg}")
    rows: list[tuple[str | None, ...]] = []
    for r in range(res.ntuples):
        row = []
        for c in range(res.nfields):
            v = res.get_value(r, c)
            row.append(v.decode() if v is not None else None)
        rows.append(tuple(row))
    return rows


@contextmanager
def exported_snapshot(dsn: str, slot: str, *, temporary: bool) -> Iterator[tuple[Lsn, str]]:
    """Create `slot` exporting a snapshot; yield (consistent point, snapshot name)."""
    check_slot_name(slot)
    conn = replication_connect(dsn)
    try:
        kind = "TEMPORARY LOGICAL" if temporary else "LOGICAL"
        rows = simple_query(
            conn, f"CREATE_REPLICATION_SLOT {quote_ident(slot)} {kind} pgoutput (SNAPSHOT 'export')")
        _name, point, snapshot, _plugin = rows[0]
        assert point is not None and snapshot is not None
        yield Lsn.parse(point), snapshot
    finally:
        conn.close()


def begin_snapshot(conn: psycopg.Connection[Any], snapshot: str) -> None:
    """Start a REPEATABLE READ transaction on `conn` that sees exactly `snapshot`."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))


def copy_table(
    src: psycopg.Connection[Any],
    dst: psycopg.Connection[Any],
    table: TableDef,
    *,
    merge: bool,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Copy `table` from `src` (in its snapshot) to `dst` (in its open transaction).

    With `merge`, rows go through a temporary table and are merged into the rows the site
    already has (see `_merge_sql`); otherwise they are copied straight into the table.
    """
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in table.copy_columns)
    out_q = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(cols, table.ident)
    target: sql.Composable = table.ident
    if merge:
        target = sql.Identifier("_cdc_sync_copy")
        dst.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp._cdc_sync_copy"))
        dst.execute(sql.SQL("CREATE TEMP TABLE _cdc_sync_copy AS SELECT {} FROM {} WITH NO DATA")
                    .format(cols, table.ident))
    in_q = sql.SQL("COPY {} ({}) FROM STDIN").format(target, cols)
    rows = 0
    with src.cursor() as rc, dst.cursor() as wc:
        with rc.copy(out_q) as cout, wc.copy(in_q) as cin:
            for data in cout:
                cin.write(data)
                n = bytes(data).count(b"\n")
                rows += n
                if on_rows is not None and n:
                    on_rows(n)
    if merge:
        for statement in _merge_sql(table, cols):
            dst.execute(statement)
        dst.execute(sql.SQL("DROP TABLE pg_temp._cdc_sync_copy"))
    return rows


def _merge_sql(table: TableDef, cols: sql.Composable) -> list[sql.Composed]:
    """Merge the copied rows (`pg_temp._cdc_sync_copy`) into a site table that has rows.

    - Keyed: upsert on the primary key (ON CONFLICT; a DEFERRABLE key cannot be an ON
      CONFLICT arbiter, so its rows are deleted and inserted again).
    - Keyless: rows are told apart only by their values, so each distinct row (compared in
      text form: json, point… have no equality) is inserted as many times as the copy has
      it more often than the site. A site that already holds the rows (a copy made again
      after `teardown`) gets nothing twice.
    """
    pk = table.primary_key
    tmp = sql.SQL("pg_temp._cdc_sync_copy")
    if pk and table.key_deferrable:
        return [
            sql.SQL("DELETE FROM {} AS t USING {} AS c WHERE {}").format(
                table.ident, tmp, sql.SQL(" AND ").join(
                    sql.SQL("t.{k} = c.{k}").format(k=sql.Identifier(k)) for k in pk)),
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(table.ident, cols, cols, tmp),
        ]
    if pk:
        others = [c for c in table.copy_columns if c not in pk]
        action = (sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in others))
            if others else sql.SQL("DO NOTHING"))
        return [sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) {}").format(
            table.ident, cols, cols, tmp,
            sql.SQL(", ").join(sql.Identifier(c) for c in pk), action)]
    return [sql.SQL(
        "WITH src AS (SELECT c, row_number() OVER (PARTITION BY c::text) AS n FROM {tmp} AS c), "
        "dst AS (SELECT d::text AS k, row_number() OVER (PARTITION BY d::text) AS n "
        "        FROM (SELECT {cols} FROM {t}) AS d) "
        "INSERT INTO {t} ({cols}) SELECT {fields} FROM src "
        "WHERE NOT EXISTS (SELECT 1 FROM dst WHERE dst.k = src.c::text AND dst.n = src.n)").format(
        t=table.ident, tmp=tmp, cols=cols,
        fields=sql.SQL(", ").join(
            sql.SQL("(src.c).{}").format(sql.Identifier(c)) for c in table.copy_columns))]

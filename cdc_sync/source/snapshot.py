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

    With `merge`, rows go through a temporary table and are upserted on the primary key (the
    site already has rows); otherwise they are copied straight into the table.
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
        pk = table.primary_key
        others = [c for c in table.copy_columns if c not in pk]
        conflict: sql.Composable = sql.SQL("")
        if pk:
            action = (sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in others))
                if others else sql.SQL("DO NOTHING"))
            conflict = sql.SQL(" ON CONFLICT ({}) {}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in pk), action)
        dst.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM pg_temp._cdc_sync_copy{}").format(
            table.ident, cols, cols, conflict))
        dst.execute(sql.SQL("DROP TABLE pg_temp._cdc_sync_copy"))
    return rows

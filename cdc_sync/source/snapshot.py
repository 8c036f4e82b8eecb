"""Consistent initial copies: an exported snapshot of a new slot, COPY from source to site.

`exported_snapshot` creates a replication slot with `SNAPSHOT 'export'` and keeps its
connection open and idle while the snapshot is used (PostgreSQL requires that). `copy_table`
streams `COPY … TO STDOUT` on the source into `COPY … FROM STDIN` on the site, with the same
session settings on both ends, so values are reproduced exactly:

- The rows are relayed as raw COPY data in blocks of `COPY_BLOCK` bytes: libpq hands over one
  row per message, so the source side is read at the `pgconn` level (no per-row Python beyond
  appending to the block) and the site gets few large writes.
- Text form, except binary form when it reproduces the values as surely: both servers of the
  same major version and every column of one of the built-in types of `BINARY_TYPES` (or an
  array of one), the same type and modifier on both ends. Binary is cheaper to parse.
- `defer_indexes`: a site table that is empty (checked under an ACCESS EXCLUSIVE lock, in the
  copy's transaction) and whose indexes nothing else depends on has them all dropped before
  the copy and made again after it from their exact definitions (names, deferrability,
  options, tablespace), in the same transaction (like pg_dump: building an index once is much
  cheaper than inserting every row into it). A failure rolls it all back: the table stays as
  it was. Indexes whose state a definition does not carry (see `_DEFERRABLE_INDEXES`) keep the
  table on the ordinary path.
"""

from __future__ import annotations

import re
import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.errors import error_from_result

from ..errors import SourceError
from ..protocol import Lsn
from .catalog import TableDef
from .stream import quote_ident, replication_connect

SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
COPY_BLOCK = 1 << 18  # bytes of COPY data per write to the site
BINARY_TRAILER = b"\xff\xff"  # the last message of a binary COPY: a row of -1 fields
WAIT = 1.0  # seconds per wait on a socket (the loop stays interruptible)
# Built-in types (pg_catalog) whose binary form is the value itself, free of OIDs, session
# settings and catalog contents; arrays of them too (their element OIDs are fixed).
BINARY_TYPES = frozenset({
    "bool", "int2", "int4", "int8", "float4", "float8", "numeric", "oid",
    "text", "varchar", "bpchar", "char", "name", "bytea", "uuid", "json", "jsonb",
    "date", "time", "timetz", "timestamp", "timestamptz", "interval",
    "inet", "cidr", "macaddr", "macaddr8", "bit", "varbit", "pg_lsn",
})


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
    defer_indexes: bool = False,
) -> int:
    """Copy `table` from `src` (in its snapshot) to `dst` (in its open transaction).

    With `merge`, rows go through a temporary table and are merged into the rows the site
    already has (see `_merge_sql`); otherwise they are copied straight into the table. With
    `defer_indexes` (and not `merge`: the caller saw the table empty), the site table's
    indexes are built after the rows are in when `_deferrable_indexes` allows it; the table is
    then locked and checked empty again first (rows that came meanwhile are merged).
    """
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in table.copy_columns)
    binary = _binary_ok(src, dst, table)
    fmt = sql.SQL(" (FORMAT binary)" if binary else "")
    if _plain_table(src, table):
        out_q = sql.SQL("COPY {} ({}) TO STDOUT{}").format(table.ident, cols, fmt)
    else:  # partitioned (rows in the partitions), or with inheritance children
        out_q = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT{}").format(cols, table.ident, fmt)
    deferred: list[SiteIndex] = []
    if defer_indexes and not merge:
        deferred = _deferrable_indexes(dst, table) or []
        if deferred:
            dst.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table.ident))
            empty = dst.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(
                table.ident)).fetchone()
            if empty is None or not empty[0]:
                merge, deferred = True, []
    target: sql.Composable = table.ident
    if merge:
        target = sql.Identifier("_cdc_sync_copy")
        dst.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp._cdc_sync_copy"))
        dst.execute(sql.SQL("CREATE TEMP TABLE _cdc_sync_copy AS SELECT {} FROM {} WITH NO DATA")
                    .format(cols, table.ident))
    _drop_indexes(dst, table, deferred)
    in_q = sql.SQL("COPY {} ({}) FROM STDIN{}").format(target, cols, fmt)
    with dst.cursor() as wc, wc.copy(in_q) as cin:
        rows = _relay(src, out_q.as_bytes(src), cin.write, on_rows)
    _create_indexes(dst, table, deferred)
    if merge:
        for statement in _merge_sql(table, cols):
            dst.execute(statement)
        dst.execute(sql.SQL("DROP TABLE pg_temp._cdc_sync_copy"))
    return rows


def _relay(src: psycopg.Connection[Any], query: bytes, write: Callable[[bytearray], object],
           on_rows: Callable[[int], None] | None) -> int:
    """Run `COPY … TO STDOUT` on `src` (in its open transaction) and hand its data to `write`
    in blocks of about `COPY_BLOCK` bytes; the number of rows copied."""
    pg = src.pgconn
    pg.send_query(query)
    while pg.flush() == 1:
        select.select([], [pg.socket], [], WAIT)
    res = _result(pg)
    if res is None or res.status != pq.ExecStatus.COPY_OUT:
        _raise(src, res)
    block = bytearray()
    messages = reported = 0
    get = pg.get_copy_data
    try:
        while True:
            n, data = get(1)
            if n > 0:  # (once per row: without a progress display, only the append)
                block += data
                if on_rows is not None and (n != 2 or bytes(data) != BINARY_TRAILER):
                    messages += 1
                if len(block) >= COPY_BLOCK:
                    write(block)
                    block = bytearray()
                    if on_rows is not None:
                        on_rows(messages - reported)
                        reported = messages
                continue
            if n == 0:
                select.select([pg.socket], [], [], WAIT)
                pg.consume_input()
                continue
            break
        if n == -2:
            raise psycopg.OperationalError(
                f"source: COPY failed: {pg.get_error_message(src.info.encoding)}")
        if block:
            write(block)
    except BaseException:
        # The site (or the source) failed mid-copy: the source session is useless now, and
        # closing it is the quickest way to stop its COPY.
        src.close()
        raise
    if on_rows is not None and messages > reported:
        on_rows(messages - reported)
    res = _result(pg)
    if res is None or res.status != pq.ExecStatus.COMMAND_OK:
        _raise(src, res)
    while _result(pg) is not None:
        pass
    # One message per row; binary adds its header to the first and a trailer message.
    tuples = res.command_tuples if res is not None else None
    return tuples if tuples is not None else messages


def _result(pg: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """The next result of `pg` (non-blocking connection), waiting on its socket meanwhile."""
    pg.consume_input()
    while pg.is_busy():
        select.select([pg.socket], [], [], WAIT)
        pg.consume_input()
    return pg.get_result()


def _raise(conn: psycopg.Connection[Any], res: pq.abc.PGresult | None) -> None:
    if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
        # Read the connection out (it stays usable for a rollback), then raise psycopg's
        # exception for the error, as a statement run by psycopg would.
        while _result(conn.pgconn) is not None:
            pass
        raise error_from_result(res, encoding=conn.info.encoding)
    status = pq.ExecStatus(res.status).name if res is not None else "no result"
    raise psycopg.OperationalError(f"source: unexpected answer to COPY: {status}")


def _plain_table(src: psycopg.Connection[Any], table: TableDef) -> bool:
    """An ordinary table without inheritance children: `COPY table TO` reads the same rows as
    `COPY (SELECT …) TO`, without a query plan."""
    row = src.execute(
        "SELECT c.relkind = 'r' AND NOT c.relhassubclass FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (table.schema, table.name)).fetchone()
    return bool(row and row[0])


def _binary_ok(src: psycopg.Connection[Any], dst: psycopg.Connection[Any],
               table: TableDef) -> bool:
    """Whether the binary COPY form carries every column of `table` unchanged from `src` to
    the site table on `dst` (see the module docstring)."""
    if src.info.server_version // 10000 != dst.info.server_version // 10000:
        return False
    wanted = {c.name: c for c in table.columns if not c.generated}
    for c in wanted.values():
        base = c.type_name[1:] if c.type_name.startswith("_") else c.type_name
        if c.type_schema != "pg_catalog" or c.type_kind != "b" or base not in BINARY_TYPES:
            return False
    site = {name: (type_sql, type_schema, type_name) for name, type_sql, type_schema, type_name
            in dst.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), tn.nspname, t.typname "
                "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "JOIN pg_namespace tn ON tn.oid = t.typnamespace "
                "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                (table.ident.as_string(dst),)).fetchall()}
    return all(site.get(name) == (c.type_sql, c.type_schema, c.type_name)
               for name, c in wanted.items())


@dataclass(frozen=True)
class SiteIndex:
    """An index of a site table, as `_deferrable_indexes` found it."""

    name: str  # the index's, and its constraint's (PostgreSQL keeps them the same)
    kind: str  # its constraint's contype: "p", "u" or "x"; "" for a plain index
    index_sql: str  # pg_get_indexdef: the whole CREATE [UNIQUE] INDEX, options included
    constraint_sql: str  # pg_get_constraintdef (options and tablespace left out), or ""
    deferrable: bool
    deferred: bool
    tablespace: str  # its tablespace, or "" for the database's default


# Every index of the table, with whether something keeps it from being dropped and made again
# from its definition: an object depending on it or on its constraint (a foreign key, a view
# grouping by the key, an extension, a partitioned parent index...; internal dependencies are
# parts made with them: the index of a constraint, the trigger checking a deferrable one), or
# a state the definition does not carry (invalid or not ready, CLUSTER ON, REPLICA IDENTITY
# USING INDEX, a comment, a security label, a statistics target, options of an EXCLUDE
# constraint's index), or a tablespace the session's role may no longer create in. Only an
# ordinary table, not a partition, that the session's role owns (dropping an index takes
# ownership).
_DEFERRABLE_INDEXES = """
SELECT ic.relname::text, coalesce(k.contype::text, ''), pg_get_indexdef(i.indexrelid),
       coalesce(pg_get_constraintdef(k.oid), ''),
       coalesce(k.condeferrable, false), coalesce(k.condeferred, false),
       coalesce(ts.spcname::text, ''),
       NOT (c.relkind = 'r' AND NOT c.relispartition AND pg_has_role(c.relowner, 'USAGE'))
       OR NOT (i.indisvalid AND i.indisready AND i.indislive)
       OR i.indisclustered OR i.indisreplident
       OR (k.contype = 'x' AND ic.reloptions IS NOT NULL)
       OR (ic.reltablespace <> 0 AND NOT has_tablespace_privilege(ic.reltablespace, 'CREATE'))
       OR EXISTS (
           SELECT 1 FROM pg_depend d
           WHERE ((d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indexrelid)
                  OR (d.refclassid = 'pg_constraint'::regclass AND d.refobjid = k.oid))
             AND d.deptype <> 'i')
       OR EXISTS (
           SELECT 1 FROM pg_depend d
           WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
             AND d.deptype NOT IN ('n', 'a', 'i'))
       OR EXISTS (
           SELECT 1 FROM pg_description x
           WHERE (x.classoid = 'pg_class'::regclass AND x.objoid = i.indexrelid)
              OR (x.classoid = 'pg_constraint'::regclass AND x.objoid = k.oid))
       OR EXISTS (
           SELECT 1 FROM pg_seclabel x
           WHERE (x.classoid = 'pg_class'::regclass AND x.objoid = i.indexrelid)
              OR (x.classoid = 'pg_constraint'::regclass AND x.objoid = k.oid))
       OR EXISTS (
           SELECT 1 FROM pg_attribute a
           WHERE a.attrelid = i.indexrelid AND coalesce(a.attstattarget, -1) <> -1)
FROM pg_class c
JOIN pg_index i ON i.indrelid = c.oid
JOIN pg_class ic ON ic.oid = i.indexrelid
LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid AND k.conrelid = c.oid
     AND k.contype IN ('p', 'u', 'x')
LEFT JOIN pg_tablespace ts ON ts.oid = ic.reltablespace
WHERE c.oid = %s::regclass
ORDER BY k.contype = 'p' DESC NULLS LAST, k.oid IS NULL, i.indexrelid
"""


def _deferrable_indexes(dst: psycopg.Connection[Any], table: TableDef) -> list[SiteIndex] | None:
    """The indexes of the site table to drop before its copy and make again after it (the
    primary key first), or None when it keeps them (see `_DEFERRABLE_INDEXES`)."""
    rows = dst.execute(_DEFERRABLE_INDEXES, (table.ident.as_string(dst),)).fetchall()
    if any(row[-1] for row in rows):
        return None
    return [SiteIndex(*row[:-1]) for row in rows]


def _drop_indexes(dst: psycopg.Connection[Any], table: TableDef,
                  indexes: list[SiteIndex]) -> None:
    """Drop `indexes` of the site table (in `dst`'s transaction, with the table locked)."""
    for index in indexes:
        if index.kind:
            dst.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                table.ident, sql.Identifier(index.name)))
        else:
            dst.execute(sql.SQL("DROP INDEX {}").format(
                sql.Identifier(table.schema, index.name)))


def _create_indexes(dst: psycopg.Connection[Any], table: TableDef,
                    indexes: list[SiteIndex]) -> None:
    """Make `indexes` again, each in its tablespace (through default_tablespace: definitions
    leave it out), then put the session's default_tablespace back.

    pg_get_constraintdef leaves out the options of a constraint's index (WITH (…)): a primary
    key or unique constraint gets its index made by its CREATE INDEX, then is added `USING
    INDEX` with its deferrability; an EXCLUDE constraint (only without options, see
    `_DEFERRABLE_INDEXES`) is added from its definition.
    """
    if not indexes:
        return
    row = dst.execute("SELECT current_setting('default_tablespace')").fetchone()
    previous = str(row[0]) if row is not None else ""
    for index in indexes:
        dst.execute("SELECT set_config('default_tablespace', %s, true)", (index.tablespace,))
        name = sql.Identifier(index.name)
        if index.kind == "x":
            dst.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table.ident, name, sql.SQL(index.constraint_sql)))
            continue
        dst.execute(sql.SQL(index.index_sql))
        if index.kind in ("p", "u"):
            timing = (" DEFERRABLE INITIALLY DEFERRED" if index.deferred
                      else " DEFERRABLE" if index.deferrable else "")
            dst.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}{}").format(
                table.ident, name, sql.SQL("PRIMARY KEY" if index.kind == "p" else "UNIQUE"),
                name, sql.SQL(timing)))
    dst.execute("SELECT set_config('default_tablespace', %s, true)", (previous,))


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

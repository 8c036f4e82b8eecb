"""Source catalog: checks, the published table list, publication, slot, and table DDL for sites.

Every query is parametrized; identifiers go through `psycopg.sql.Identifier`. Errors are
`SourceError`s with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..errors import SourceError

# Never published, never copied: our own bookkeeping and the system's.
EXCLUDED_SCHEMAS = ("cdc_sync", "pg_catalog", "information_schema", "pg_toast")


@dataclass(frozen=True, slots=True)
class ColumnDef:
    name: str
    type_sql: str
    not_null: bool
    generated: bool
    type_schema: str
    type_name: str
    type_kind: str  # pg_type.typtype: b base, e enum, d domain, r range, c composite, m multirange
    generation_expr: str | None = None


@dataclass(frozen=True, slots=True)
class TableDef:
    schema: str
    name: str
    columns: tuple[ColumnDef, ...]
    primary_key: tuple[str, ...]
    replica_identity: str  # d, n, f, i
    has_identity_index: bool
    # A DEFERRABLE primary key cannot be the replica identity: PostgreSQL then has none.
    key_deferrable: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def copy_columns(self) -> tuple[str, ...]:
        """Columns carried by the stream and the snapshot (generated ones are computed)."""
        return tuple(c.name for c in self.columns if not c.generated)


def matches(patterns: Sequence[str], qualified: str) -> bool:
    return any(fnmatch.fnmatchcase(qualified, p) for p in patterns)


def list_tables(conn: psycopg.Connection[Any], patterns: Sequence[str]) -> list[tuple[str, str]]:
    """Ordinary and partitioned tables whose `schema.table` matches a pattern (no partitions)."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
          AND n.nspname NOT LIKE 'pg\\_toast%%'
        ORDER BY 1, 2
        """,
        (list(EXCLUDED_SCHEMAS),),
    ).fetchall()
    return [(s, t) for s, t in rows if matches(patterns, f"{s}.{t}")]


def describe_table(conn: psycopg.Connection[Any], schema: str, name: str) -> TableDef:
    row = conn.execute(
        """
        SELECT c.oid, c.relreplident,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s
        """,
        (schema, name),
    ).fetchone()
    if row is None:
        raise SourceError(f"source: table {schema}.{name} does not exist")
    oid, replident, has_ident_index = row
    cols = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               a.attgenerated <> '', tn.nspname, t.typname, t.typtype,
               CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END
        FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        JOIN pg_namespace tn ON tn.oid = t.typnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (oid,),
    ).fetchall()
    pk = conn.execute(
        """
        SELECT array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     ORDER BY k.ord),
               NOT i.indimmediate
        FROM pg_index i WHERE i.indrelid = %s AND i.indisprimary
        """,
        (oid,),
    ).fetchone()
    return TableDef(
        schema, name,
        tuple(ColumnDef(*c) for c in cols),
        tuple(pk[0]) if pk else (),
        replident, bool(has_ident_index),
        key_deferrable=bool(pk[1]) if pk else False,
    )


def check_source(conn: psycopg.Connection[Any], tables: Sequence[TableDef], slot: str) -> None:
    """wal_level, privileges, free slots, and a usable replica identity on every table."""
    encoding = conn.execute("SHOW server_encoding").fetchone()
    if encoding is None or encoding[0] != "UTF8":
        raise SourceError(
            f"source: database encoding is {encoding[0] if encoding else '?'}; cdc-sync needs "
            "UTF8 (the stream carries values as UTF-8 text)")
    wal_level = conn.execute("SHOW wal_level").fetchone()
    if wal_level is None or wal_level[0] != "logical":
        raise SourceError(
            f"source: wal_level is {wal_level[0] if wal_level else '?'}, needs 'logical' "
            "(ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL)"
        )
    priv = conn.execute(
        "SELECT rolsuper OR rolreplication, current_user FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if priv is None or not priv[0]:
        user = priv[1] if priv else "?"
        raise SourceError(
            f"source: role {user} lacks the REPLICATION privilege "
            f"(ALTER ROLE {sql.Identifier(user).as_string(conn)} REPLICATION)"
        )
    slots = conn.execute(
        """
        SELECT current_setting('max_replication_slots')::int,
               (SELECT count(*) FROM pg_replication_slots),
               EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)
        """,
        (slot,),
    ).fetchone()
    assert slots is not None
    if not slots[2] and slots[1] >= slots[0]:
        raise SourceError(
            f"source: all {slots[0]} replication slots are in use "
            "(raise max_replication_slots, or drop an unused slot)"
        )
    for t in tables:
        ok = (
            (t.replica_identity == "d" and t.primary_key and not t.key_deferrable)
            or t.replica_identity == "f"
            or (t.replica_identity == "i" and t.has_identity_index)
        )
        if not ok:
            fix = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(t.ident).as_string(conn)
            if t.replica_identity == "d" and t.primary_key:
                # Published, its UPDATEs and DELETEs would fail on the source itself.
                raise SourceError(
                    f"source: table {t.qualified} has a DEFERRABLE primary key, which cannot "
                    f"identify rows for logical replication; make it NOT DEFERRABLE or run: "
                    f"{fix}"
                )
            raise SourceError(
                f"source: table {t.qualified} has no primary key or replica identity; "
                f"add a primary key or run: {fix}"
            )


def ensure_publication(conn: psycopg.Connection[Any], name: str,
                       tables: Sequence[TableDef]) -> None:
    """Create the publication for exactly `tables`, or set its table list to them."""
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    table_list = sql.SQL(", ").join(t.ident for t in tables)
    if exists is None:
        if tables:
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(name), table_list))
        else:
            conn.execute(sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(name)))
    elif tables:
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
            sql.Identifier(name), table_list))


def slot_info(conn: psycopg.Connection[Any], slot: str) -> dict[str, Any] | None:
    row = conn.execute(
        """
        SELECT s.slot_name, s.plugin, s.active, s.confirmed_flush_lsn::text,
               pg_current_wal_lsn()::text,
               pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
               d.datname = current_database()
        FROM pg_replication_slots s LEFT JOIN pg_database d ON d.oid = s.datoid
        WHERE s.slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return None
    keys = ("slot", "plugin", "active", "confirmed_flush_lsn", "current_lsn", "retained_bytes",
            "same_database")
    return dict(zip(keys, row, strict=True))


def create_site_table_sql(t: TableDef) -> sql.Composed:
    """CREATE TABLE for a site: columns, types, NOT NULL and the primary key of the source
    (DEFERRABLE INITIALLY DEFERRED when the source's is deferrable).

    Generated columns keep their expression (`GENERATED ALWAYS AS (…) STORED`): the stream does
    not carry them, the site computes them as the source does.
    """
    parts: list[sql.Composable] = []
    for c in t.columns:
        gen = (sql.SQL(" GENERATED ALWAYS AS ({}) STORED").format(sql.SQL(c.generation_expr))
               if c.generated and c.generation_expr else sql.SQL(""))
        parts.append(sql.SQL("{} {}{}{}").format(
            sql.Identifier(c.name), sql.SQL(c.type_sql), sql.SQL(" NOT NULL" if c.not_null else ""),
            gen))
    if t.primary_key:
        # A DEFERRABLE key lets a source transaction pass through duplicates (swapping keys in
        # one statement); the site replays those row changes one by one and must only check
        # at commit too.
        parts.append(sql.SQL("PRIMARY KEY ({}){}").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in t.primary_key),
            sql.SQL(" DEFERRABLE INITIALLY DEFERRED" if t.key_deferrable else "")))
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(t.ident, sql.SQL(", ").join(parts))


def user_types(conn: psycopg.Connection[Any], t: TableDef) -> list[tuple[str, str, str, str]]:
    """User-defined types `t` needs on a site, each after the types it depends on:
    (schema, name, kind, definition), kind `e` enum, `d` domain or `c` composite.

    For an enum the definition is its labels joined by NUL; for a domain its base type SQL
    followed by NUL, "NOT NULL" or "", and its constraint definitions; for a composite type
    its attributes as "quoted_name type" joined by NUL. Arrays stand for their element type,
    a domain needs its base type (an enum, another domain…), a composite its attributes'.
    """
    out: list[tuple[str, str, str, str]] = []
    seen: set[int] = set()
    for c in t.columns:
        if c.type_schema in ("pg_catalog", "information_schema"):
            continue
        row = conn.execute(
            "SELECT t.oid FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE n.nspname = %s AND t.typname = %s", (c.type_schema, c.type_name)).fetchone()
        if row is not None:
            _collect_type(conn, int(row[0]), out, seen)
    return out


def _collect_type(conn: psycopg.Connection[Any], oid: int,
                  out: list[tuple[str, str, str, str]], seen: set[int]) -> None:
    if oid in seen:
        return
    seen.add(oid)
    row = conn.execute(
        """SELECT n.nspname, t.typname, t.typtype::text, t.typelem, t.typcategory::text,
                  t.typbasetype, format_type(t.typbasetype, t.typtypmod), t.typnotnull,
                  t.typrelid, (SELECT c.relkind::text FROM pg_class c WHERE c.oid = t.typrelid)
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = %s""",
        (oid,),
    ).fetchone()
    if row is None:
        return
    schema, name, kind, elem, category, base, base_sql, notnull, relid, relkind = row
    if schema in ("pg_catalog", "information_schema"):
        return
    if category == "A" and elem:
        _collect_type(conn, int(elem), out, seen)
    elif kind == "e":
        labels = conn.execute(
            "SELECT array_agg(enumlabel::text ORDER BY enumsortorder) FROM pg_enum "
            "WHERE enumtypid = %s", (oid,)).fetchone()
        out.append((schema, name, "e", "\0".join(labels[0] if labels and labels[0] else [])))
    elif kind == "d":
        _collect_type(conn, int(base), out, seen)
        checks = conn.execute(
            "SELECT array(SELECT pg_get_constraintdef(k.oid) FROM pg_constraint k "
            "WHERE k.contypid = %s AND k.contype = 'c' ORDER BY k.conname)", (oid,)).fetchone()
        out.append((schema, name, "d", "\0".join(
            [base_sql, "NOT NULL" if notnull else "", *(checks[0] if checks else [])])))
    elif kind == "c" and relkind == "c":
        attrs = conn.execute(
            "SELECT a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod) "
            "FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 "
            "AND NOT a.attisdropped ORDER BY a.attnum", (relid,)).fetchall()
        for _attname, atttype, _sql in attrs:
            _collect_type(conn, int(atttype), out, seen)
        out.append((schema, name, "c", "\0".join(
            f"{sql.Identifier(attname).as_string(conn)} {type_sql}"
            for attname, _t, type_sql in attrs)))

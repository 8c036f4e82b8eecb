"""Set-based statements for one `Run`, built with `psycopg.sql` (identifiers quoted).

Values travel as text arrays, one parameter per column (`string_to_array(%s, …)` when packed,
`%b::text[]` otherwise; see `_arrays`), and are cast on the site to the site column's type
(`format_type` of the site's catalog), so every type round-trips through its own input
function: nothing is lost between source and site. Column aliases inside the statements are
positional (`c0`, `k0`, …) so no user identifier can collide with them.

The arrays become rows as `(SELECT unnest(a) AS c0, unnest(b) AS c1, …) AS v` (`rows_from`):
set-returning functions in a select list run in lockstep without being stored first, where
`unnest(a, b, …) AS v(c0, c1, …)` (a function scan) puts every array into a tuplestore before
the first row comes out. Measured on 300,000 rows in 5,000-row statements, site CPU: UPDATE
1.50 -> 1.41 s, INSERT … ON CONFLICT 1.11 -> 0.96 s, DELETE 0.52 -> 0.49 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from ..changes import Table


@dataclass(frozen=True, slots=True)
class SiteTable:
    """What the applier needs of a site table: its name, column types, identity and conflict key.

    `types[i]` is the site type (SQL text) of source column `i`; `key` are source column indexes
    identifying a row on the site (empty: keyless, matched on every column); `upsert` tells
    whether a unique index on exactly those columns exists (so ON CONFLICT can target it).
    """

    table: Table
    types: tuple[str, ...]
    key: tuple[int, ...]
    upsert: bool

    @property
    def ident(self) -> sql.SQL:
        return param_ident(self.table.schema, self.table.name)

    def col(self, i: int) -> sql.SQL:
        return param_ident(self.table.columns[i])

    def typ(self, i: int) -> sql.SQL:
        # Type names come from the site's own catalog (format_type), already quoted there.
        return sql.SQL(self.types[i].replace("%", "%%"))


def param_ident(*names: str) -> sql.SQL:
    """A quoted identifier for a statement executed WITH parameters.

    psycopg reads every `%` of such a query as a placeholder, even inside a quoted identifier,
    so a table named `x%s` would break the statement: the `%` are doubled here. (Statements
    run without parameters, like TRUNCATE, use `sql.Identifier` as is.)
    """
    return sql.SQL(sql.Identifier(*names).as_string(None).replace("%", "%%"))


_BINARY_PARAM = sql.SQL("%b::text[]")
_PACKED_PARAM = sql.SQL("string_to_array(%s, E'\\x1f', E'\\x1e')")


def rows_from(aliases: Sequence[sql.Identifier], packed: bool = False) -> sql.Composed:
    """`(SELECT unnest(<param>) AS <alias>, …) AS v`: one text-array parameter per alias (packed
    or binary), as rows (see the module docstring)."""
    param = _PACKED_PARAM if packed else _BINARY_PARAM
    return sql.SQL("(SELECT {}) AS v").format(sql.SQL(", ").join(
        sql.SQL("unnest({}) AS {}").format(param, a) for a in aliases))


def _aliases(prefix: str, n: int) -> list[sql.Identifier]:
    return [sql.Identifier(f"{prefix}{j}") for j in range(n)]


def insert_sql(st: SiteTable, columns: Sequence[int], upsert: bool, packed: bool = False
               ) -> sql.Composed:
    """INSERT … SELECT FROM unnest(…) [ON CONFLICT (key) DO UPDATE SET every other column]."""
    vals = _aliases("c", len(columns))
    stmt = sql.SQL("INSERT INTO {t} ({cols}) SELECT {casts} FROM {rows}").format(
        t=st.ident,
        cols=sql.SQL(", ").join(st.col(i) for i in columns),
        casts=sql.SQL(", ").join(
            sql.SQL("v.{a}::{ty}").format(a=a, ty=st.typ(i)) for a, i in zip(vals, columns, strict=True)
        ),
        rows=rows_from(vals, packed),
    )
    if upsert and st.key:
        others = [i for i in columns if i not in st.key]
        action = (
            sql.SQL("DO UPDATE SET {sets}").format(
                sets=sql.SQL(", ").join(
                    sql.SQL("{c} = EXCLUDED.{c}").format(c=st.col(i)) for i in others
                )
            )
            if others
            else sql.SQL("DO NOTHING")
        )
        stmt = sql.SQL("{s} ON CONFLICT ({k}) {a}").format(
            s=stmt, k=sql.SQL(", ").join(st.col(i) for i in st.key), a=action
        )
    return stmt


def update_sql(st: SiteTable, columns: Sequence[int], packed: bool = False) -> sql.Composed:
    """UPDATE t SET cols FROM rows of (old key…, new values…) WHERE t.key = old key."""
    keys = _aliases("k", len(st.key))
    vals = _aliases("c", len(columns))
    return sql.SQL("UPDATE {t} AS t SET {sets} FROM {rows} WHERE {where}").format(
        t=st.ident,
        sets=sql.SQL(", ").join(
            sql.SQL("{c} = v.{a}::{ty}").format(c=st.col(i), a=a, ty=st.typ(i))
            for a, i in zip(vals, columns, strict=True)
        ),
        rows=rows_from(keys + vals, packed),
        where=_key_match(st, keys),
    )


def delete_sql(st: SiteTable, packed: bool = False) -> sql.Composed:
    """DELETE FROM t USING rows of (keys…) WHERE t.key = key."""
    keys = _aliases("k", len(st.key))
    return sql.SQL("DELETE FROM {t} AS t USING {rows} WHERE {where}").format(
        t=st.ident, rows=rows_from(keys, packed), where=_key_match(st, keys),
    )


def _key_match(st: SiteTable, keys: Sequence[sql.Identifier]) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("t.{c} = v.{a}::{ty}").format(c=st.col(i), a=a, ty=st.typ(i))
        for a, i in zip(keys, st.key, strict=True)
    )


def _row_match(st: SiteTable, columns: Sequence[int]) -> sql.Composable:
    # Keyless rows are matched on every column sent, compared in canonical text form: that
    # works for types without an equality operator (json, point) and for NaN.
    if not columns:
        return sql.SQL("true")
    return sql.SQL(" AND ").join(
        sql.SQL("t.{c}::text IS NOT DISTINCT FROM (%s::{ty})::text").format(c=st.col(i), ty=st.typ(i))
        for i in columns
    )


def keyless_delete_sql(st: SiteTable, match: Sequence[int]) -> sql.Composed:
    """Delete exactly one row equal to the old row (a duplicate row stays a duplicate)."""
    return sql.SQL(
        "DELETE FROM {t} WHERE ctid = (SELECT ctid FROM {t} AS t WHERE {m} LIMIT 1)"
    ).format(t=st.ident, m=_row_match(st, match))


def keyless_update_sql(st: SiteTable, columns: Sequence[int], match: Sequence[int]) -> sql.Composed:
    """Update exactly one row equal to the old row."""
    return sql.SQL(
        "UPDATE {t} SET {sets} WHERE ctid = (SELECT ctid FROM {t} AS t WHERE {m} LIMIT 1)"
    ).format(
        t=st.ident,
        sets=sql.SQL(", ").join(
            sql.SQL("{c} = %s::{ty}").format(c=st.col(i), ty=st.typ(i)) for i in columns
        ),
        m=_row_match(st, match),
    )


def truncate_sql(tables: Sequence[Table], restart_identity: bool, cascade: bool) -> sql.Composed:
    return sql.SQL("TRUNCATE {ts}{r}{c}").format(
        ts=sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables),
        r=sql.SQL(" RESTART IDENTITY" if restart_identity else ""),
        c=sql.SQL(" CASCADE" if cascade else ""),
    )


PROGRESS_UPSERT = sql.SQL(
    "INSERT INTO cdc_sync.progress (source, applied_lsn, commit_ts, updated_at) "
    "VALUES (%s, %s::pg_lsn, %s, now()) ON CONFLICT (source) DO UPDATE SET "
    "applied_lsn = EXCLUDED.applied_lsn, commit_ts = EXCLUDED.commit_ts, updated_at = now()"
)

PROGRESS_SELECT = sql.SQL(
    "SELECT applied_lsn::text, commit_ts, snapshot_lsn::text FROM cdc_sync.progress WHERE source = %s"
)

SITE_COLUMNS = sql.SQL(
    """
    SELECT c.oid, a.attname, format_type(a.atttypid, -1), a.attgenerated <> ''
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
    ORDER BY a.attnum
    """
)

SITE_UNIQUE_INDEXES = sql.SQL(
    """
    SELECT i.indisprimary,
           array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 ORDER BY k.ord)
    FROM pg_index i
    WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
      AND i.indisvalid AND i.indimmediate
    ORDER BY i.indisprimary DESC
    """
)


def existing_keys_sql(st: SiteTable) -> sql.Composed:
    """The keys, among those given, that have a row on the site (as text)."""
    keys = _aliases("k", len(st.key))
    return sql.SQL("SELECT {cols} FROM {t} AS t JOIN {rows} ON {where}").format(
        cols=sql.SQL(", ").join(sql.SQL("v.{}").format(a) for a in keys),
        t=st.ident, rows=rows_from(keys), where=_key_match(st, keys),
    )


def insert_absent_sql(st: SiteTable, columns: Sequence[int], packed: bool = False
                      ) -> sql.Composed:
    """INSERT rows whose key is absent (ON CONFLICT DO NOTHING), returning the inserted keys
    as text: a key missing from the result was inserted concurrently by someone else."""
    return sql.SQL("{ins} ON CONFLICT ({k}) DO NOTHING RETURNING {ret}").format(
        ins=insert_sql(st, columns, False, packed),
        k=sql.SQL(", ").join(st.col(i) for i in st.key),
        ret=sql.SQL(", ").join(sql.SQL("{}::text").format(st.col(i)) for i in st.key),
    )

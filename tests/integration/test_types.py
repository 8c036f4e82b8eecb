"""The type zoo: 40-odd column types with edge values, identical on the sites after the initial
copy, streamed inserts, updates (every column changed) and deletes.

Values are compared column by column as `col::text` under the replicator's session settings,
so any loss (precision, NaN, infinity, signed zero, whitespace in json, array bounds) shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
import pytest
from psycopg import sql

from .conftest import Env
from .helpers import assert_converged, connect, execute, replicating

SPECIAL_TEXT = ("tab\there, new\nline, cr\rret, back\\slash \\\\ \\N, quotes ' \" `, "
                "emoji 😀👍🏽, ümlaut, 中文, right-to-left עברית, zero-width\u200b, "
                + "".join(chr(c) for c in range(1, 32)) + " \x7f end")

# column name -> (type, values as text literals; None is NULL). Row r takes value r % len.
COLUMNS: dict[str, tuple[str, Sequence[str | None]]] = {
    "i2": ("int2", ["-32768", "32767", "0"]),
    "i4": ("int4", ["-2147483648", "2147483647", "0"]),
    "i8": ("int8", ["-9223372036854775808", "9223372036854775807", "-1"]),
    "num": ("numeric", [
        "NaN", "Infinity", "-Infinity",
        "123456789012345678901234567890123456789012345678901234567890."
        "00000000000000000000000000000000000000000000000000000000000001",
        "-0.000000000000000000000000000000000000000000000000000000000000000000001",
        "9" * 1000 + "." + "9" * 1000, "0.10", "-0"]),
    "num_p": ("numeric(20,5)", ["-999999999999999.99999", "0.00001", "NaN", "12.30000"]),
    "f4": ("float4", ["NaN", "Infinity", "-Infinity", "-0", "1.4e-45", "3.4028235e+38",
                      "1.17549435e-38", "0.1"]),
    "f8": ("float8", ["NaN", "Infinity", "-Infinity", "-0", "5e-324", "1.7976931348623157e+308",
                      "2.2250738585072014e-308", "0.1", "-1.2345678901234567e-100"]),
    "t": ("text", [SPECIAL_TEXT, "", " ", "NULL", "\\N", "'quoted'", '{"a":"b"}']),
    "vc": ("varchar(12)", ["", "abc   ", "ääääääääääää", "twelve chars"]),
    "ch": ("char(5)", ["a", "", "abcde", "  x"]),
    "qch": ('"char"', ["a", "Z", "\\"]),
    "by": ("bytea", ["\\x00ff00fe7f80", "\\x", "\\x" + "00" * 300, "\\x5c0a0d27"]),
    "bo": ("bool", ["true", "false"]),
    "d": ("date", ["infinity", "-infinity", "4713-01-01 BC", "5874897-12-31", "2000-02-29",
                   "0001-01-01 BC"]),
    "ts": ("timestamp", ["infinity", "-infinity", "4713-01-01 00:00:00 BC",
                         "294276-12-31 23:59:59.999999", "2024-02-29 12:34:56.123456"]),
    "tstz": ("timestamptz", ["-infinity", "infinity", "4713-01-01 00:00:00+00 BC",
                             "294276-12-31 23:59:59.999999+00", "2024-03-31 01:30:00+14",
                             "1900-01-01 00:00:00-03:30"]),
    "tm": ("time", ["00:00:00", "24:00:00", "23:59:59.999999", "12:00:00.5"]),
    "tmtz": ("timetz", ["00:00:00+15:59", "24:00:00-15:59", "12:34:56.789+05:45"]),
    "iv": ("interval", ["-1 years -2 mons +3 days -04:05:06.789", "178000000 years",
                        "-178000000 years", "00:00:00", "1 mon -30 days", "0.000001 secs"]),
    "u": ("uuid", ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
                   "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    "j": ("json", ['{"a": 1, "a": 2,   "b" : [1, 2, {"c": null}]}', '  [ ]  ', '"\\u0000x"',
                  '1e1000', '{"k": "tab\\t\\u00e9"}']),
    "jb": ("jsonb", ['{"a": 1, "a": 2, "b": [1, 2.50, {"c": null}]}', "[]", '"\\u00e9"',
                    "1e100", '{"nested": {"deep": [true, false, null]}}']),
    "inet_": ("inet", ["192.168.0.1/24", "::1", "0.0.0.0/0", "2001:db8::ff00:42:8329/64"]),
    "cidr_": ("cidr", ["10.0.0.0/8", "::/0", "192.168.100.128/25"]),
    "mac": ("macaddr", ["08:00:2b:01:02:03", "ff:ff:ff:ff:ff:ff"]),
    "mac8": ("macaddr8", ["08:00:2b:01:02:03:04:05", "00:00:00:ff:fe:00:00:00"]),
    "pt": ("point", ["(1.5,-2)", "(NaN,Infinity)", "(0,-0)"]),
    "bx": ("box", ["(1,1),(0,0)", "(-1.5,2.25),(-3,-4)"]),
    "ci": ("circle", ["<(1,2),3>", "<(0,0),0>"]),
    "pa": ("path", ["[(0,0),(1,1),(2,0)]", "((0,0),(1,1),(2,0))"]),
    "pg": ("polygon", ["((0,0),(1,1),(2,0))", "((-1,-1),(1e10,1e-10))"]),
    "li": ("line", ["{1,-1,0}", "{0,1,-2.5}"]),
    "ls": ("lseg", ["[(0,0),(1,1)]", "[(-1e300,1e300),(0,0)]"]),
    "r4": ("int4range", ["empty", "[1,)", "(,)", "[-2147483648,2147483647)", "(1,2]"]),
    "rn": ("numrange", ["[1.5,2.5)", "(,0]", "empty", "[-Infinity,)"]),
    "rtz": ("tstzrange", ["[2020-01-01 00:00:00+00,infinity)", "empty",
                          "(-infinity,2024-01-01 12:00:00+02]", "(,)"]),
    "mr": ("int4multirange", ["{}", "{[1,3),[5,7)}", "{(,0),[10,)}"]),
    "ia": ("int[]", ["{1,NULL,3}", "{}", "[0:2]={7,8,9}", "{NULL}"]),
    "ta": ("text[]", ['{"a,b","c\\"d","NULL",NULL,"","e\\\\f","{x}"," sp "}', "{}",
                      '{"\\t","😀"}']),
    "ia2": ("int[][]", ["{{1,2},{3,4}}", "{{NULL,2},{3,NULL}}", "[1:1][-1:0]={{5,6}}"]),
    "fa": ("float8[]", ["{NaN,Infinity,-Infinity,-0,5e-324}", "{}"]),
    "ra": ("int4range[]", ['{"[1,2)",empty,"(,)"}']),
    "mood": ("zoo.mood", ["sad", "ok", "happy 😀", "it's \"odd\""]),
    "pos": ("zoo.positive", ["1", "2147483647"]),
    "code": ("zoo.code", ["AB-1", "ZZ-999"]),
    "moodarr": ("zoo.mood[]", ['{sad,"happy 😀"}', "{}"]),
    "mon": ("money", ["-92233720368547758.08", "92233720368547758.07", "0", "12.34"]),
    "bit8": ("bit(8)", ["10101010", "00000000", "11111111"]),
    "vbit": ("varbit", ["", "1", "0" * 100 + "1"]),
    "tsv": ("tsvector", ["a fat:1A cat:2B,3 'quoted word':4", "", "'\\\\back' 'it''s'"]),
    "tsq": ("tsquery", ["fat & (rat | cat)", "!a <-> b"]),
    "o": ("oid", ["0", "4294967295"]),
    "lsn": ("pg_lsn", ["0/0", "FFFFFFFF/FFFFFFFF", "16/B374D848"]),
    "xid8_": ("xid8", ["0", "18446744073709551615"]),
    "nm": ("name", ["", "a name with spaces", "x" * 63]),
    "cmp": ("zoo.pair", ['(1,"a ""b"", c")', "(,)", "(-1,)"]),
}

XML_VALUES = ['<a b="1">x &amp; y</a>', "plain text", '<?xml version="1.0"?><r/>']

ZOO_TYPES = [
    "CREATE SCHEMA zoo",
    "CREATE TYPE zoo.mood AS ENUM ('sad', 'ok', 'happy 😀', 'it''s \"odd\"')",
    "CREATE DOMAIN zoo.positive AS int CHECK (VALUE > 0)",
    "CREATE DOMAIN zoo.code AS text NOT NULL CHECK (VALUE ~ '^[A-Z]+-[0-9]+$')",
]
COMPOSITE = "CREATE TYPE zoo.pair AS (n int, s text)"


def _xml_supported(dsn: str) -> bool:
    try:
        with connect(dsn) as conn:
            conn.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:
        return False
    return True


def _columns(dsn: str) -> dict[str, tuple[str, Sequence[str | None]]]:
    cols = dict(COLUMNS)
    if _xml_supported(dsn):
        cols["x"] = ("xml", XML_VALUES)
    return cols


def _row(cols: dict[str, tuple[str, Sequence[str | None]]], r: int) -> list[str | None]:
    return [values[r % len(values)] for _typ, values in cols.values()]


def _insert(conn: psycopg.Connection[tuple[object, ...]], table: sql.Composable,
            cols: dict[str, tuple[str, Sequence[str | None]]], row_id: int,
            values: list[str | None]) -> None:
    names = sql.SQL(", ").join(sql.Identifier(c) for c in ["id", *cols])
    casts = sql.SQL(", ").join(
        [sql.Placeholder()] + [sql.SQL("%s::{}").format(sql.SQL(t)) for t, _v in cols.values()])
    conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(table, names, casts),
                 [row_id, *values])


def _update(conn: psycopg.Connection[tuple[object, ...]], table: sql.Composable,
            cols: dict[str, tuple[str, Sequence[str | None]]], row_id: int,
            values: list[str | None]) -> None:
    sets = sql.SQL(", ").join(
        sql.SQL("{} = %s::{}").format(sql.Identifier(c), sql.SQL(t))
        for c, (t, _v) in cols.items())
    conn.execute(sql.SQL("UPDATE {} SET {} WHERE id = %s").format(table, sets),
                 [*values, row_id])


def _as_text(name: str) -> sql.Composable:
    """The column in its text form. For xml that is its output function (psycopg reads it as
    str), not `::text` (the stored string): xml_out drops a default `<?xml version="1.0"?>`
    declaration, so COPY and pgoutput (and PostgreSQL's own logical replication) carry the
    value without it."""
    if name == "x":
        return sql.Identifier(name)
    return sql.SQL("{}::text").format(sql.Identifier(name))


def _column_texts(dsn: str, table: sql.Composable, names: list[str]) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {}
    with connect(dsn) as conn:
        for name in ["id", *names]:
            out[name] = [r[0] for r in conn.execute(
                sql.SQL("SELECT {} FROM {} ORDER BY id").format(
                    _as_text(name), table)).fetchall()]
    return out


def _assert_columns_equal(source: str, sites: list[str], table: sql.Composable,
                          names: list[str]) -> None:
    expected = _column_texts(source, table, names)
    assert len(expected["id"]) > 0
    for site in sites:
        got = _column_texts(site, table, names)
        for name in ["id", *names]:
            assert got[name] == expected[name], f"column {name} differs on the site"


def test_type_zoo(env: Env) -> None:
    cols = _columns(env.source)
    nrows = max(len(v) for _t, v in cols.values())
    table = sql.Identifier("zoo", "animals")
    col_defs = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, (t, _v) in cols.items())
    execute(env.source, *ZOO_TYPES, COMPOSITE,
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {})").format(table, col_defs))
    # here the sites already have the table (init checks and uses it)
    for site in env.sites:
        execute(site, *ZOO_TYPES, COMPOSITE,
                sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {})").format(table, col_defs))
    names = list(cols)
    with connect(env.source) as conn:
        for r in range(nrows):  # copied by the initial snapshot
            _insert(conn, table, cols, r, _row(cols, r))
        conn.execute(sql.SQL("INSERT INTO {} (id, code) VALUES (-1, 'NULL-0')").format(table))
    settings = env.settings(tables=["zoo.*"])
    with replicating(settings) as pipe:
        _assert_columns_equal(env.source, env.sites, table, names)  # the copy
        with connect(env.source) as conn:
            for r in range(nrows):  # streamed inserts
                _insert(conn, table, cols, 100 + r, _row(cols, r))
            conn.execute(sql.SQL("INSERT INTO {} (id, code) VALUES (-2, 'NULL-1')").format(table))
        assert_converged(settings, pipe)
        _assert_columns_equal(env.source, env.sites, table, names)
        with connect(env.source) as conn:  # every column of every row changes
            for r in range(nrows):
                _update(conn, table, cols, r, _row(cols, r + 1))
                _update(conn, table, cols, 100 + r, _row(cols, r + 2))
            _update(conn, table, cols, -1, _row(cols, 0))  # NULLs to values
            conn.execute(sql.SQL("UPDATE {} SET {} WHERE id = 0").format(  # values to NULLs
                table, sql.SQL(", ").join(sql.SQL("{} = NULL").format(sql.Identifier(c))
                                          for c in names if c != "code")))
        assert_converged(settings, pipe)
        _assert_columns_equal(env.source, env.sites, table, names)
        execute(env.source, sql.SQL("DELETE FROM {} WHERE id % 2 = 1").format(table))
        assert_converged(settings, pipe)
        _assert_columns_equal(env.source, env.sites, table, names)


@pytest.mark.parametrize("identity", ["full"])
def test_type_zoo_keyless(env: Env, identity: str) -> None:
    """The same values in a keyless REPLICA IDENTITY FULL table: rows are found by comparing
    every column's text form, which must work for NaN, json, points, arrays…"""
    cols = {k: v for k, v in _columns(env.source).items() if k != "cmp"}
    nrows = max(len(v) for _t, v in cols.values())
    table = sql.Identifier("zoo", "keyless")
    col_defs = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, (t, _v) in cols.items())
    execute(env.source, *ZOO_TYPES,
            sql.SQL("CREATE TABLE {} (id int, {})").format(table, col_defs),
            sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table))
    names = list(cols)
    settings = env.settings(tables=["zoo.*"])
    with replicating(settings) as pipe:
        with connect(env.source) as conn:
            for r in range(nrows):
                _insert(conn, table, cols, r, _row(cols, r))
                _insert(conn, table, cols, r, _row(cols, r))  # a duplicate of each row
        assert_converged(settings, pipe)
        with connect(env.source) as conn:
            for r in range(nrows):
                conn.execute(sql.SQL("UPDATE {} SET id = id + 100, i4 = 42 WHERE ctid = "
                                     "(SELECT min(ctid) FROM {} WHERE id = %s)").format(
                                         table, table), (r,))
        assert_converged(settings, pipe)
        execute(env.source, sql.SQL("DELETE FROM {} WHERE id % 3 = 0").format(table))
        assert_converged(settings, pipe)
        for dsn in [env.source, *env.sites]:
            with connect(dsn) as conn:
                counts = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE id < 100), "
                                              "count(*) FILTER (WHERE id >= 100) FROM {}")
                                      .format(table)).fetchone()
            assert counts is not None and counts[0] > 0 and counts[1] > 0
        for site in env.sites:
            for name in ["id", *names]:
                q = sql.SQL("SELECT {} FROM {}").format(_as_text(name), table)
                with connect(env.source) as a, connect(site) as b:
                    got, want = b.execute(q).fetchall(), a.execute(q).fetchall()
                assert sorted(got, key=repr) == sorted(want, key=repr), name


def test_types_created_by_init(env: Env) -> None:
    """init creates the site table, the enum, the domains and the composite type itself,
    and the copied and streamed values are the same."""
    cols = _columns(env.source)
    table = sql.Identifier("zoo", "made")
    col_defs = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, (t, _v) in cols.items())
    execute(env.source, *ZOO_TYPES, COMPOSITE,
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {})").format(table, col_defs))
    with connect(env.source) as conn:
        _insert(conn, table, cols, 1, _row(cols, 1))
    settings = env.settings(tables=["zoo.*"])
    with replicating(settings) as pipe:
        with connect(env.source) as conn:
            for r in range(4):
                _insert(conn, table, cols, 10 + r, _row(cols, r + 3))
        assert_converged(settings, pipe)
        _assert_columns_equal(env.source, env.sites, table, list(cols))

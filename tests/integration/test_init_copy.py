"""How `init` copies: key built after the rows, binary or text form, block relay, and the
site's schema migration running beside the copy."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cdc_sync import commands
from cdc_sync.errors import SiteError
from cdc_sync.sinks import schema
from cdc_sync.source import catalog, snapshot
from cdc_sync.source.snapshot import copy_table

from .conftest import Env
from .helpers import assert_same_tables, connect, execute, scalar

PK_XMIN = ("SELECT k.xmin::text FROM pg_constraint k "
           "WHERE k.conrelid = %s::regclass AND k.contype = 'p'")
PK_DEF = ("SELECT k.conname::text, pg_get_constraintdef(k.oid) FROM pg_constraint k "
          "WHERE k.conrelid = %s::regclass AND k.contype = 'p'")


def _rows_xmin(dsn: str, table: str) -> list[str]:
    with connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT DISTINCT xmin::text FROM {table}")]  # noqa: S608


def test_created_tables_get_their_key_after_the_rows_in_the_same_transaction(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE k (region text, id int, v text, PRIMARY KEY (region, id))",
            "CREATE TABLE d (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v int)",
            "ALTER TABLE d REPLICA IDENTITY FULL",
            "CREATE TABLE pre (id int PRIMARY KEY, v int)",
            "INSERT INTO k SELECT 'r' || g % 3, g, 'v' || g FROM generate_series(1, 5000) g",
            "INSERT INTO d SELECT g, g FROM generate_series(1, 2000) g",
            "INSERT INTO pre SELECT g, g FROM generate_series(1, 100) g")
    site = env.sites[0]
    execute(site, "CREATE TABLE pre (id int PRIMARY KEY, v int)")  # the site's own, empty
    settings = env.settings(sites=[site])
    report = commands.init(settings)
    assert sorted(report.created_tables["site1"]) == ["public.d", "public.k"]
    assert report.copied == {"site1": 7100}
    assert_same_tables(env.source, [site], min_rows=100)
    for table in ("k", "d"):
        with connect(env.source) as conn:
            source_key = conn.execute(PK_DEF, (table,)).fetchone()
        with connect(site) as conn:
            assert conn.execute(PK_DEF, (table,)).fetchone() == source_key
        # The key was added by the transaction that copied the rows (so never missing).
        assert _rows_xmin(site, table) == [scalar(site, PK_XMIN, (table,))]
    # A table init did not create, empty too, gets the same treatment: its key, unchanged, is
    # made again by the copy's transaction.
    assert _rows_xmin(site, "pre") == [scalar(site, PK_XMIN, ("pre",))]
    with connect(site) as conn:
        assert conn.execute(PK_DEF, ("pre",)).fetchone() == ("pre_pkey", "PRIMARY KEY (id)")
    assert scalar(site, "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                  "WHERE conrelid = 'd'::regclass") == "PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED"


def test_a_failed_copy_leaves_the_created_table_with_its_key(env: Env) -> None:
    execute(env.source, "CREATE TABLE k (id int PRIMARY KEY, v text)",
            "INSERT INTO k SELECT g, 'v' || g FROM generate_series(1, 1000) g")
    site = env.sites[0]
    settings = env.settings(sites=[site])
    real = snapshot._relay

    def failing(*args: Any, **kwargs: Any) -> int:
        real(*args, **kwargs)
        raise RuntimeError("copy interrupted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshot, "_relay", failing)
        with pytest.raises(RuntimeError):
            commands.init(settings)
    assert scalar(site, "SELECT count(*) FROM k") == 0
    assert scalar(site, "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                  "WHERE conrelid = 'k'::regclass AND contype = 'p'") == "PRIMARY KEY (id)"


SPECIAL_VALUES = [
    """CREATE TABLE vals (
        id int PRIMARY KEY, b bool, s int2, i int4, l int8, r float4, d float8,
        n numeric, n2 numeric(10, 3), t text, vc varchar(5), c char(4), nm name, ba bytea,
        u uuid, j json, jb jsonb, dt date, tm time, tz timetz, ts timestamp, tt timestamptz,
        iv interval, ip inet, ci cidr, ma macaddr, bi bit(3), vb varbit, lsn pg_lsn,
        ia int[], ta text[], na numeric[])""",
    """INSERT INTO vals VALUES
        (1, true, -32768, 2147483647, -9223372036854775808, 'NaN', '-Infinity',
         'NaN', 1234567.125, E'tab\\there\\nnew line \\\\ back ü€', 'ab', 'x', 'nm',
         E'\\\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1,  "b": 2}',
         '{"z": [1, 2.50, null]}', '-infinity', '24:00:00', '23:59:59.999999+14:59',
         'infinity', '2024-02-29 12:34:56.789012+05:30', '1 year -2 mons 3 days 04:05:06.7',
         '2001:db8::1/64', '10.1.0.0/16', '08:00:2b:01:02:03', B'101', B'1', '16/B374D848',
         '{{1,NULL},{3,4}}', '{"a b", NULL, "", "NULL"}', '{NaN, 1.50}'),
        (2, NULL, NULL, NULL, NULL, '-0', 1e-308, '-0.000', NULL, '', '', '', '', '', NULL,
         'null', 'null', '2000-01-01', '00:00', '00:00+00', '1999-12-31 23:59:59',
         '-infinity', '0', '::ffff:1.2.3.4', '::/0', 'ff:ff:ff:ff:ff:ff', B'000', B'',
         '0/0', '{}', '{}', '{}')""",
    "CREATE DOMAIN pos AS int CHECK (VALUE > 0)",
    "CREATE TABLE dom (id int PRIMARY KEY, p pos)",
    "INSERT INTO dom SELECT g, g FROM generate_series(1, 50) g",
    "CREATE TABLE wide (id int PRIMARY KEY, v varchar(10), w int)",
    "INSERT INTO wide SELECT g, 'v' || g, g FROM generate_series(1, 50) g",
]


def test_binary_where_it_is_safe_text_elsewhere_same_values(env: Env) -> None:
    execute(env.source, *SPECIAL_VALUES)
    created, own = env.sites
    # The site's own `wide`: a longer varchar and a bigint; the values fit, the forms differ.
    execute(own, "CREATE TABLE wide (id int PRIMARY KEY, v varchar(20), w bigint)")
    settings = env.settings()
    commands.init(settings)
    assert_same_tables(env.source, env.sites, ["public.vals", "public.dom", "public.wide"],
                       min_rows=2)
    with connect(env.source) as src:
        tables = {t: catalog.describe_table(src, "public", t) for t in ("vals", "dom", "wide")}
        with connect(created) as dst:
            assert snapshot._binary_ok(src, dst, tables["vals"])
            assert snapshot._binary_ok(src, dst, tables["wide"])
            assert not snapshot._binary_ok(src, dst, tables["dom"])  # a domain: text
        with connect(own) as dst:
            assert not snapshot._binary_ok(src, dst, tables["wide"])  # other types: text
            execute(own, "ALTER TABLE wide ALTER COLUMN v TYPE varchar(10), "
                         "ALTER COLUMN w TYPE int")
            assert snapshot._binary_ok(src, dst, tables["wide"])  # now the same types


def test_relay_in_blocks_counts_every_row(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    execute(env.source, "CREATE TABLE big (id int PRIMARY KEY, v text)",
            "INSERT INTO big SELECT g, repeat('x', g % 50) FROM generate_series(1, 3000) g")
    execute(env.sites[0], "CREATE TABLE big (id int PRIMARY KEY, v text)")
    monkeypatch.setattr(snapshot, "COPY_BLOCK", 1000)  # many blocks
    with connect(env.source) as conn:
        table = catalog.describe_table(conn, "public", "big")
    progress: list[int] = []
    with connect(env.source, autocommit=False) as src, \
            connect(env.sites[0], autocommit=False) as dst:
        rows = copy_table(src, dst, table, merge=False, on_rows=progress.append)
        dst.commit()
        src.rollback()
    assert rows == 3000
    assert sum(progress) == 3000 and len(progress) > 10  # binary: the trailer is no row
    assert_same_tables(env.source, env.sites[:1], ["public.big"], min_rows=3000)


def test_source_error_during_copy_is_psycopgs_and_the_site_gets_nothing(env: Env) -> None:
    import psycopg

    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)",
            "INSERT INTO t SELECT generate_series(1, 10)")
    execute(env.sites[0], "CREATE TABLE t (id int PRIMARY KEY)")
    with connect(env.source) as conn:
        table = catalog.describe_table(conn, "public", "t")
    execute(env.source, "DROP TABLE t")
    with connect(env.source, autocommit=False) as src, \
            connect(env.sites[0], autocommit=False) as dst:
        with pytest.raises(psycopg.errors.UndefinedTable):
            copy_table(src, dst, table, merge=False)
        src.rollback()
        assert src.execute("SELECT 1").fetchone() == (1,)  # still usable


def test_migration_runs_beside_the_copy_and_is_waited_for(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    execute(env.source, "CREATE TABLE a (id int PRIMARY KEY, v text)",
            "INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 500) g")
    settings = env.settings()
    real = schema.migrate_site
    started: list[float] = []
    finished: list[float] = []

    def slow(dsn: str) -> None:
        started.append(time.monotonic())
        time.sleep(2.0)
        real(dsn)
        finished.append(time.monotonic())

    monkeypatch.setattr(commands, "migrate_site", slow)
    begun = time.monotonic()
    report = commands.init(settings)
    assert report.copied == {"site1": 500, "site2": 500}
    assert len(finished) == 2
    # Beside each other and beside the copy: far less than one after the other (4 s and more).
    assert time.monotonic() - begun < 3.6
    for site in env.sites:
        assert scalar(site, "SELECT snapshot_lsn::text FROM cdc_sync.progress") \
            == report.snapshot_lsn
    assert_same_tables(env.source, env.sites, min_rows=500)


def test_a_failed_migration_fails_init_and_commits_no_copy(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    execute(env.source, "CREATE TABLE a (id int PRIMARY KEY, v text)",
            "INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 500) g")
    settings = env.settings(sites=env.sites[:1])
    real = schema.migrate_site

    def failing(dsn: str) -> None:
        time.sleep(0.5)  # still running while the copy goes on
        raise SiteError("site database x: cannot migrate the cdc_sync schema: boom")

    monkeypatch.setattr(commands, "migrate_site", failing)
    with pytest.raises(SiteError, match="boom"):
        commands.init(settings)
    site = env.sites[0]
    assert scalar(site, "SELECT count(*) FROM a") == 0
    assert scalar(site, "SELECT to_regclass('cdc_sync.progress') IS NULL")
    # Fixed, init again: the copy is made (at a new snapshot; the slot was kept).
    monkeypatch.setattr(commands, "migrate_site", real)
    report = commands.init(settings)
    assert report.copied == {"site1": 500}
    assert_same_tables(env.source, [site], min_rows=500)


# -- a site table made beforehand: indexes built after the rows while it is empty ---------------

INDEX_DEFS = "SELECT indexname::text, indexdef FROM pg_indexes WHERE tablename = %s ORDER BY 1"
CONSTRAINT_DEFS = ("SELECT conname::text, contype::text, pg_get_constraintdef(oid), condeferrable, "
                   "condeferred FROM pg_constraint WHERE conrelid = %s::regclass ORDER BY 1")
# Each index of the table: (name, its pg_class row's xmin, its oid)
INDEX_ROWS = ("SELECT c.relname::text, c.xmin::text, c.oid::int FROM pg_index i "
              "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass ORDER BY 1")
NOT_NULL = ("SELECT attname::text, attnotnull FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum")


def _shape(dsn: str, table: str) -> tuple[list[Any], ...]:
    """What a table's indexes and constraints are, by definition (not by oid)."""
    with connect(dsn) as conn:
        return tuple(conn.execute(q, (table,)).fetchall()
                     for q in (INDEX_DEFS, CONSTRAINT_DEFS, NOT_NULL))


def _index_rows(dsn: str, table: str) -> list[tuple[str, str, int]]:
    with connect(dsn) as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(INDEX_ROWS, (table,))]


SOURCE_T = ("CREATE TABLE t (id int PRIMARY KEY, code text, grp int, v int)",
            "INSERT INTO t SELECT g, md5(g::text), g % 7, g FROM generate_series(1, 3000) g")
SITE_T = (
    "CREATE TABLE t (id int, code text NOT NULL, grp int, v int, "
    " CONSTRAINT t_pk PRIMARY KEY (id) WITH (fillfactor = 80), "
    " CONSTRAINT t_code_key UNIQUE (code) DEFERRABLE INITIALLY DEFERRED, "
    " CONSTRAINT t_grp_v UNIQUE (grp, v) INCLUDE (code) DEFERRABLE)",
    "CREATE INDEX t_v_partial ON t (v DESC NULLS LAST) WHERE v > 10",
    "CREATE INDEX t_lower_code ON t USING hash (lower(code)) WITH (fillfactor = 70)",
    "CREATE INDEX t_grp ON t (grp)")


def test_an_empty_site_table_gets_every_index_made_again_after_the_rows(env: Env) -> None:
    execute(env.source, *SOURCE_T)
    site = env.sites[0]
    execute(site, *SITE_T)
    before = _shape(site, "t")
    assert len(before[0]) == 6 and len(before[1]) == 3
    report = commands.init(env.settings(sites=[site]))
    assert report.created_tables == {"site1": []}
    assert report.copied == {"site1": 3000}
    assert_same_tables(env.source, [site], min_rows=3000)
    assert _shape(site, "t") == before  # the same definitions, names, options, deferrability
    # Every index was made again by the transaction that copied the rows.
    rows_xmin = _rows_xmin(site, "t")
    assert [xmin for _, xmin, _ in _index_rows(site, "t")] == rows_xmin * 6
    # The deferrable constraints still work as such.
    with connect(site, autocommit=False) as conn:
        conn.execute("UPDATE t SET code = 'x' WHERE id = 1")
        conn.execute("UPDATE t SET code = md5('1') WHERE id = 1")
        conn.commit()


def test_a_site_table_with_rows_keeps_its_indexes(env: Env) -> None:
    execute(env.source, *SOURCE_T)
    site = env.sites[0]
    execute(site, *SITE_T,
            "INSERT INTO t SELECT g, md5(g::text), g % 7, g FROM generate_series(1, 10) g")
    before, indexes = _shape(site, "t"), _index_rows(site, "t")
    report = commands.init(env.settings(sites=[site]))
    assert report.copied == {"site1": 3000}
    assert_same_tables(env.source, [site], min_rows=3000)  # merged with the rows it had
    assert _shape(site, "t") == before
    assert _index_rows(site, "t") == indexes  # not made again


def test_rows_that_came_before_the_lock_are_merged(env: Env) -> None:
    """`copy_table` told the table is empty finds rows once it holds the lock: it merges."""
    execute(env.source, *SOURCE_T)
    site = env.sites[0]
    execute(site, *SITE_T,
            "INSERT INTO t SELECT g, md5(g::text), g % 7, g FROM generate_series(1, 10) g")
    indexes = _index_rows(site, "t")
    with connect(env.source) as conn:
        table = catalog.describe_table(conn, "public", "t")
    with connect(env.source, autocommit=False) as src, \
            connect(site, autocommit=False) as dst:
        assert copy_table(src, dst, table, merge=False, defer_indexes=True) == 3000
        dst.commit()
        src.rollback()
    assert_same_tables(env.source, [site], ["public.t"], min_rows=3000)
    assert _index_rows(site, "t") == indexes


def test_tables_whose_indexes_something_depends_on_keep_them(env: Env) -> None:
    execute(env.source, *SOURCE_T,
            "CREATE TABLE p (id int PRIMARY KEY, v int)",
            "CREATE TABLE g (id int PRIMARY KEY, v int)",
            "CREATE TABLE c (id int PRIMARY KEY, v int)",
            "INSERT INTO p SELECT g, g FROM generate_series(1, 500) g",
            "INSERT INTO g SELECT g, g FROM generate_series(1, 500) g",
            "INSERT INTO c SELECT g, g FROM generate_series(1, 500) g")
    site = env.sites[0]
    execute(site, "CREATE TABLE p (id int PRIMARY KEY, v int)",
            "CREATE TABLE site_child (id int PRIMARY KEY, p_id int REFERENCES p)",  # a foreign key
            "CREATE TABLE g (id int PRIMARY KEY, v int)",
            "CREATE VIEW g_sums AS SELECT id, v, count(*) FROM g GROUP BY id",  # uses g's key
            "CREATE TABLE c (id int PRIMARY KEY, v int)",
            "CREATE INDEX c_v ON c (v)", "ALTER TABLE c CLUSTER ON c_v",  # not in a definition
            *SITE_T,
            "COMMENT ON INDEX t_grp IS 'a comment'")  # neither is a comment
    before = {name: (_shape(site, name), _index_rows(site, name)) for name in ("p", "g", "c", "t")}
    report = commands.init(env.settings(sites=[site]))
    assert report.copied == {"site1": 4500}
    assert_same_tables(env.source, [site], min_rows=500)
    for name, (shape, indexes) in before.items():
        assert _shape(site, name) == shape, name
        assert _index_rows(site, name) == indexes, name  # the same indexes, never dropped
    assert scalar(site, "SELECT indisclustered FROM pg_index WHERE indexrelid = 'c_v'::regclass")
    assert scalar(site, "SELECT obj_description('t_grp'::regclass, 'pg_class')") == "a comment"


def test_a_copy_failing_midway_leaves_the_indexes_as_they_were(env: Env) -> None:
    import psycopg

    execute(env.source, *SOURCE_T)
    site = env.sites[0]
    execute(site, *SITE_T, "ALTER TABLE t ADD CONSTRAINT t_small CHECK (v < 2500)")
    before, indexes = _shape(site, "t"), _index_rows(site, "t")
    settings = env.settings(sites=[site])
    with pytest.raises(psycopg.errors.CheckViolation):
        commands.init(settings)
    assert scalar(site, "SELECT count(*) FROM t") == 0
    assert _shape(site, "t") == before
    assert _index_rows(site, "t") == indexes
    # The site fixed, init again: the copy is made, the indexes built after it.
    execute(site, "ALTER TABLE t DROP CONSTRAINT t_small")
    before = _shape(site, "t")
    assert commands.init(settings).copied == {"site1": 3000}
    assert_same_tables(env.source, [site], min_rows=3000)
    assert _shape(site, "t") == before
    assert [xmin for _, xmin, _ in _index_rows(site, "t")] == _rows_xmin(site, "t") * 6

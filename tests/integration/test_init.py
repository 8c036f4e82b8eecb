"""`init`: checks, idempotence, site tables made from the source, consistent initial copies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cdc_sync import commands
from cdc_sync.embedded import Cluster
from cdc_sync.errors import CdcSyncError, SiteError, SourceError

from .conftest import Env
from .helpers import (
    assert_converged,
    assert_same_tables,
    connect,
    execute,
    make_settings,
    replicating,
    run_cli,
    running_pipeline,
    scalar,
    slot_row,
    table_fingerprint,
    wait_until_caught_up,
    write_config,
)


def _objects(dsn: str) -> list[tuple[str, ...]]:
    """Every user relation, type and publication of a database (what init may create)."""
    with connect(dsn) as conn:
        rels = conn.execute(
            "SELECT 'rel', n.nspname, c.relname, c.relkind::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')").fetchall()
        types = conn.execute(
            "SELECT 'type', n.nspname, t.typname, t.typtype::text FROM pg_type t "
            "JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')").fetchall()
        pubs = conn.execute("SELECT 'pub', pubname, '', '' FROM pg_publication").fetchall()
    return sorted(rels + types + pubs)


def test_init_is_idempotent(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE a (id int PRIMARY KEY, v text)",
            "CREATE TABLE b (x int, y int)",
            "ALTER TABLE b REPLICA IDENTITY FULL",
            "INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 100) g",
            "INSERT INTO b SELECT g, g FROM generate_series(1, 30) g")
    settings = env.settings()
    first = commands.init(settings)
    assert first.slot_created
    assert sorted(first.tables) == ["public.a", "public.b"]
    assert first.copied == {"site1": 130, "site2": 130}
    assert first.created_tables == {"site1": ["public.a", "public.b"],
                                    "site2": ["public.a", "public.b"]}
    assert_same_tables(env.source, env.sites, min_rows=30)
    before = {dsn: _objects(dsn) for dsn in [env.source, *env.sites]}
    progress = {dsn: scalar(dsn, "SELECT row(p.*)::text FROM cdc_sync.progress p")
                for dsn in env.sites}
    slot = slot_row(env.source, settings.source.slot)

    second = commands.init(settings)
    assert not second.slot_created
    assert second.copied == {}
    assert second.snapshot_lsn is None
    assert second.created_tables == {"site1": [], "site2": []}
    assert {dsn: _objects(dsn) for dsn in [env.source, *env.sites]} == before
    assert {dsn: scalar(dsn, "SELECT row(p.*)::text FROM cdc_sync.progress p")
            for dsn in env.sites} == progress
    assert slot_row(env.source, settings.source.slot) == slot
    assert scalar(env.source, "SELECT count(*) FROM pg_replication_slots") == 1
    for site in env.sites:  # nothing copied twice (b has no key: duplicates would show)
        assert scalar(site, "SELECT count(*) FROM b") == 30
    assert_same_tables(env.source, env.sites)


def test_keyless_table_without_replica_identity_is_refused(env: Env, tmp_path: Path) -> None:
    execute(env.source,
            "CREATE TABLE ok (id int PRIMARY KEY)",
            'CREATE TABLE "Log Entries" (at timestamptz, msg text)')
    settings = env.settings()
    with pytest.raises(SourceError) as err:
        commands.init(settings)
    message = str(err.value)
    assert "public.Log Entries" in message
    fix = message[message.index("ALTER TABLE"):]
    assert fix.endswith("REPLICA IDENTITY FULL") and '"Log Entries"' in fix, message
    # nothing was set up on the source
    assert scalar(env.source, "SELECT count(*) FROM pg_replication_slots") == 0
    # the CLI: non-zero exit, one line on stderr naming the table and the fix
    config = write_config(tmp_path / "c.toml", env.settings_dict())
    proc = run_cli("init", "-c", str(config))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fix in lines[0] and "Traceback" not in proc.stderr
    # the suggested statement is the fix: with it, init passes
    execute(env.source, fix)
    assert commands.init(settings).copied == {"site1": 0, "site2": 0}


def test_site_table_missing_a_column_is_refused(env: Env) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, amount numeric, note text)")
    execute(env.sites[1], "CREATE TABLE t (id int PRIMARY KEY, note text)")
    with pytest.raises(SiteError) as err:
        commands.init(env.settings())
    assert "public.t.amount" in str(err.value)
    assert "site2" in str(err.value)


def test_extra_site_columns_with_defaults_are_fine(env: Env) -> None:
    execute(env.source,
            "CREATE TABLE t (id int PRIMARY KEY, v text, n int)",
            "INSERT INTO t SELECT g, 'v' || g, g FROM generate_series(1, 10) g")
    for site in env.sites:  # other column order, and columns the source does not have
        execute(site, "CREATE TABLE t (local_note text DEFAULT 'local', n int, "
                      "seen_at timestamptz NOT NULL DEFAULT now(), v text, "
                      "id int PRIMARY KEY, flag bool NOT NULL DEFAULT true)")
    settings = env.settings()
    with replicating(settings) as pipe:
        execute(env.source, "INSERT INTO t VALUES (11, 'eleven', 11)",
                "UPDATE t SET v = 'changed', n = -n WHERE id IN (1, 11)",
                "DELETE FROM t WHERE id = 2",
                "UPDATE t SET id = 20 WHERE id = 3")
        wait_until_caught_up(settings, pipeline=pipe)
        expected = table_fingerprint(env.source, "public.t", ["id", "v", "n"])
        for site in env.sites:
            assert table_fingerprint(site, "public.t", ["id", "v", "n"]) == expected
            assert scalar(site, "SELECT count(*) FROM t WHERE local_note = 'local' AND flag "
                                "AND seen_at IS NOT NULL") == len(expected)


CREATED_SOURCE = [
    "CREATE SCHEMA shop",
    "CREATE TYPE shop.state AS ENUM ('new', 'paid', 'shipped', 'it''s done')",
    "CREATE DOMAIN shop.qty AS int NOT NULL CHECK (VALUE >= 0) CHECK (VALUE < 1000000)",
    "CREATE DOMAIN shop.email AS varchar(200) CHECK (VALUE LIKE '%@%')",
    "CREATE TABLE shop.orders (region char(2) NOT NULL, id bigint NOT NULL, "
    " state shop.state NOT NULL DEFAULT 'new', qty shop.qty, price numeric(12, 3), "
    " customer shop.email, tags text[], placed timestamptz(3), meta jsonb, "
    " total numeric GENERATED ALWAYS AS (qty * price) STORED, "
    " vc varchar(17), bits bit varying(9), PRIMARY KEY (region, id))",
]

CATALOG_COLUMNS = """
SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.attgenerated::text, coalesce(pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = 'shop.orders'::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
CATALOG_PK = """
SELECT array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o)
FROM pg_index i WHERE i.indrelid = 'shop.orders'::regclass AND i.indisprimary
"""
CATALOG_TYPES = """
SELECT t.typname, t.typtype::text, format_type(t.typbasetype, t.typtypmod), t.typnotnull,
       array(SELECT enumlabel::text FROM pg_enum WHERE enumtypid = t.oid ORDER BY enumsortorder),
       array(SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c WHERE c.contypid = t.oid
             ORDER BY 1)
FROM pg_type t WHERE t.typnamespace = 'shop'::regnamespace AND t.typtype IN ('e', 'd')
ORDER BY 1
"""


def test_site_tables_created_from_the_source_definition(env: Env) -> None:
    execute(env.source, *CREATED_SOURCE,
            "INSERT INTO shop.orders (region, id, state, qty, price, customer, tags, placed, "
            "meta, vc, bits) VALUES ('eu', 1, 'paid', 3, 2.5, 'a@b', '{x,\"y z\"}', "
            "'2024-01-01 10:00:00.123+00', '{\"k\": 1}', 'v', B'101')")
    settings = env.settings(tables=["shop.*"])
    report = commands.init(settings)
    assert report.created_tables == {"site1": ["shop.orders"], "site2": ["shop.orders"]}
    with connect(env.source) as conn:
        columns = conn.execute(CATALOG_COLUMNS).fetchall()
        pk = conn.execute(CATALOG_PK).fetchall()
        types = conn.execute(CATALOG_TYPES).fetchall()
    assert pk == [(["region", "id"],)]
    for site in env.sites:
        with connect(site) as conn:
            site_columns = conn.execute(CATALOG_COLUMNS).fetchall()
            # defaults are the site's business; everything else is the source's
            assert [c[:5] for c in site_columns] == [c[:5] for c in columns]
            gen = [c for c in site_columns if c[4] == "s"]
            assert [(c[1], c[5]) for c in gen] == [
                (c[1], c[5]) for c in columns if c[4] == "s"]
            assert conn.execute(CATALOG_PK).fetchall() == pk
            assert conn.execute(CATALOG_TYPES).fetchall() == types
    assert_same_tables(env.source, env.sites, ["shop.orders"], min_rows=1)
    with running_pipeline(settings) as pipe:
        execute(env.source,
                "INSERT INTO shop.orders (region, id, state, qty, price, customer) "
                "VALUES ('us', 2, 'it''s done', 999999, 0.001, 'x@y')",
                "UPDATE shop.orders SET qty = qty + 1, state = 'shipped' WHERE id = 1")
        assert_converged(settings, pipe, ["shop.orders"])


def test_wal_level_is_checked(make_cluster: Callable[..., Cluster], cluster: Cluster) -> None:
    replica = make_cluster(settings={"wal_level": "replica"})
    source = replica.create_database("src")
    site = cluster.create_database(f"walsite_{replica.port}")
    try:
        execute(source, "CREATE TABLE t (id int PRIMARY KEY)")
        settings = make_settings(source, [site])
        with pytest.raises(SourceError) as err:
            commands.init(settings)
        message = str(err.value)
        assert "wal_level" in message and "replica" in message and "logical" in message
    finally:
        cluster.drop_database(f"walsite_{replica.port}")


def _writer(dsn: str, stop: threading.Event, counter: list[int],
            errors: list[BaseException]) -> None:
    """Insert, update and delete continuously, one small transaction at a time."""
    try:
        with connect(dsn) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                with conn.transaction():
                    conn.execute("INSERT INTO hot (id, v) VALUES (%s, %s)", (100_000 + i, i))
                    conn.execute("INSERT INTO hot_log (n) VALUES (%s)", (i,))
                    conn.execute("UPDATE hot SET v = v + 1 WHERE id = %s", (1 + i * 7 % 5000,))
                    if i % 5 == 0:
                        conn.execute("DELETE FROM hot WHERE id = %s", (100_000 + i - 3,))
                counter[0] = i
    except BaseException as exc:
        errors.append(exc)


def _start_writer(dsn: str) -> tuple[threading.Thread, threading.Event, list[int],
                                       list[BaseException]]:
    stop = threading.Event()
    counter = [0]
    errors: list[BaseException] = []
    thread = threading.Thread(target=_writer, args=(dsn, stop, counter, errors), daemon=True)
    thread.start()
    return thread, stop, counter, errors


HOT_TABLES = [
    "CREATE TABLE hot (id int PRIMARY KEY, v int, pad text)",
    "CREATE TABLE hot_log (n int, at timestamptz DEFAULT clock_timestamp())",
    "ALTER TABLE hot_log REPLICA IDENTITY FULL",
    "INSERT INTO hot SELECT g, 0, repeat('p', 200) FROM generate_series(1, 60000) g",
    "INSERT INTO hot_log (n) SELECT -g FROM generate_series(1, 1000) g",
]


def test_initial_copy_is_consistent_with_concurrent_writes(env: Env) -> None:
    execute(env.source, *HOT_TABLES)
    settings = env.settings()
    thread, stop, counter, errors = _start_writer(env.source)
    try:
        while counter[0] < 20:
            time.sleep(0.01)
        before = counter[0]
        report = commands.init(settings)
        during = counter[0] - before
        time.sleep(0.3)
        with running_pipeline(settings) as pipe:
            time.sleep(1.0)
            stop.set()
            thread.join(10)
            assert not errors, errors
            assert_converged(settings, pipe, timeout=60, min_rows=1000)
    finally:
        stop.set()
        thread.join(10)
    assert report.copied["site1"] >= 61_000
    assert during > 0, "the writer made no transaction while init was copying"
    for site in env.sites:  # a transaction both copied and streamed would double a log row
        assert scalar(site, "SELECT count(*) - count(DISTINCT n) FROM hot_log") == 0


def test_site_added_later_gets_a_copy_consistent_with_the_stream(
        env: Env, make_db: Callable[..., str]) -> None:
    execute(env.source, *HOT_TABLES)
    first = env.settings(sites=env.sites[:1])
    commands.init(first)
    with running_pipeline(first) as pipe:
        execute(env.source, "UPDATE hot SET v = -1 WHERE id <= 100")
        assert_converged(first, pipe, min_rows=1000)
    execute(env.source, "UPDATE hot SET v = -2 WHERE id <= 50")  # while nothing runs
    both = env.settings()  # site1 and the new site2
    thread, stop, counter, errors = _start_writer(env.source)
    try:
        while counter[0] < 20:
            time.sleep(0.01)
        report = commands.init(both)  # copies to site2 only, while the writer goes on
        assert set(report.copied) == {"site2"}
        assert not report.slot_created
        time.sleep(0.3)
        with running_pipeline(both) as pipe:
            time.sleep(0.5)
            stop.set()
            thread.join(10)
            assert not errors, errors
            execute(env.source, "UPDATE hot SET v = -3 WHERE id <= 25")
            assert_converged(both, pipe, timeout=60, min_rows=1000)
    finally:
        stop.set()
        thread.join(10)
    for site in env.sites:
        assert scalar(site, "SELECT count(*) - count(DISTINCT n) FROM hot_log") == 0
    # the temporary slot of the second copy is gone, the real one is still there
    assert scalar(env.source, "SELECT array_agg(slot_name::text) FROM pg_replication_slots") \
        == [both.source.slot]


def test_init_refuses_a_new_copy_while_run_is_active(env: Env) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    first = env.settings(sites=env.sites[:1])
    commands.init(first)
    with running_pipeline(first) as pipe:
        assert_converged(first, pipe)
        with pytest.raises(CdcSyncError) as err:
            commands.init(env.settings())
        assert "site2" in str(err.value)
    assert scalar(env.sites[1], "SELECT to_regclass('public.t') IS NULL "
                                "OR NOT EXISTS (SELECT 1 FROM t)") is True


def test_init_on_an_unreachable_site_names_it(env: Env) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)")
    bad = env.sites[0].rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(CdcSyncError) as err:
        commands.init(env.settings(sites=[bad]))
    assert "no_such_database_here" in str(err.value)


NESTED_TYPES = [
    "CREATE SCHEMA kinds",
    "CREATE TYPE kinds.color AS ENUM ('red', 'green', 'blue')",
    "CREATE TYPE kinds.size AS ENUM ('S', 'M', 'L')",
    "CREATE DOMAIN kinds.warm AS kinds.color CHECK (VALUE <> 'blue')",
    "CREATE DOMAIN kinds.pct AS numeric(5, 2) CHECK (VALUE BETWEEN 0 AND 100)",
    "CREATE DOMAIN kinds.small_pct AS kinds.pct CHECK (VALUE < 10)",
    "CREATE TYPE kinds.dims AS (w int, h int, unit text)",
    "CREATE TABLE kinds.item (id int PRIMARY KEY, sizes kinds.size[], warm kinds.warm, "
    " discount kinds.small_pct, box kinds.dims, boxes kinds.dims[])",
]


def test_site_tables_created_with_nested_user_types(env: Env) -> None:
    """An enum used only as an array element, a domain over an enum, a domain over a
    domain, and composite types: init creates them (dependencies first) on every site."""
    execute(env.source, *NESTED_TYPES,
            "INSERT INTO kinds.item VALUES (1, '{S,L}', 'red', 5.5, '(1,2,cm)', "
            "'{\"(3,4,mm)\",\"(,,)\"}')")
    settings = env.settings(tables=["kinds.*"])
    report = commands.init(settings)
    assert report.created_tables["site1"] == ["kinds.item"]
    with connect(env.source) as conn:
        columns = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'kinds.item'::regclass AND attnum > 0 ORDER BY attnum").fetchall()
    for site in env.sites:
        with connect(site) as conn:
            assert conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'kinds.item'::regclass AND attnum > 0 ORDER BY attnum"
            ).fetchall() == columns
            with pytest.raises(psycopg.errors.CheckViolation):  # the domains' checks came too
                conn.execute("SELECT 'blue'::kinds.warm")
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("SELECT 20::kinds.small_pct")
    with running_pipeline(settings) as pipe:
        execute(env.source, "INSERT INTO kinds.item VALUES (2, '{M}', 'green', 0, "
                            "'(5,6,\"a b\")', '{}')",
                "UPDATE kinds.item SET box = '(7,8,in)', sizes = sizes || 'M'::kinds.size "
                "WHERE id = 1")
        assert_converged(settings, pipe, ["kinds.item"], min_rows=2)


def test_deferrable_primary_key_without_full_identity_is_refused(env: Env) -> None:
    """A DEFERRABLE primary key is no replica identity: published, the table's UPDATEs and
    DELETEs would fail on the source itself. init refuses it, naming the table and a fix."""
    execute(env.source, "CREATE TABLE d (id int PRIMARY KEY DEFERRABLE, v text)",
            "INSERT INTO d VALUES (1, 'one')")
    settings = env.settings()
    with pytest.raises(SourceError) as err:
        commands.init(settings)
    message = str(err.value)
    assert "public.d" in message and "DEFERRABLE" in message
    fix = message[message.index("ALTER TABLE"):]
    execute(env.source, "UPDATE d SET v = 'still writable'")  # the source is untouched
    execute(env.source, fix)
    commands.init(settings)
    execute(env.source, "UPDATE d SET v = 'published'")


def test_init_again_after_teardown_copies_nothing_twice(env: Env) -> None:
    """A new slot means a new initial copy into sites that already hold the rows: keyed rows
    are upserted, keyless rows (duplicates included) are not added again."""
    execute(env.source,
            "CREATE TABLE k (a int, b text, j json)", "ALTER TABLE k REPLICA IDENTITY FULL",
            "CREATE TABLE t (id int PRIMARY KEY, v text)",
            "INSERT INTO k VALUES (1, 'x', '{\"a\": 1}'), (1, 'x', '{\"a\": 1}'), (2, 'y', NULL)",
            "INSERT INTO t VALUES (1, 'one'), (2, 'two')")
    settings = env.settings()
    commands.init(settings)
    assert commands.teardown(settings)
    execute(env.source, "INSERT INTO k VALUES (1, 'x', '{\"a\": 1}'), (3, 'z', '[]')",
            "UPDATE t SET v = 'changed' WHERE id = 2", "INSERT INTO t VALUES (3, 'three')")
    report = commands.init(settings)
    assert report.slot_created and set(report.copied) == {"site1", "site2"}
    assert_same_tables(env.source, env.sites, ["public.k", "public.t"], min_rows=3)
    for site in env.sites:
        assert scalar(site, "SELECT count(*) FROM k") == 5

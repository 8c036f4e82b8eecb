"""`schema_head.sql`: a fresh site's `cdc_sync` schema made without importing alembic.

The file is alembic's offline rendering of base -> head (`schema.render_head_sql`); these tests
keep it current and prove a site made from it is the same as one made by alembic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from alembic import command
from psycopg.conninfo import conninfo_to_dict

from cdc_sync.embedded import ServerBinaries
from cdc_sync.sinks import schema
from cdc_sync.sinks.schema import head_revision, migrate_site, schema_version

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "python -m cdc_sync.sinks.schema --render-head-sql"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
PROBE = ("import sys; from cdc_sync.sinks.schema import migrate_site; migrate_site(sys.argv[1]); "
         "print('alembic' in sys.modules, 'sqlalchemy' in sys.modules)")


def migrate_in_a_process(dsn: str) -> str:
    """Run `migrate_site` in a new interpreter; "alembic-imported sqlalchemy-imported"."""
    done = subprocess.run([sys.executable, "-c", PROBE, dsn], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def alembic_upgrade(dsn: str, target: str = "head") -> None:
    """Upgrade with alembic itself (online), as `migrate_site` did before schema_head.sql."""
    engine = schema.make_engine(dsn)
    try:
        with engine.begin() as connection:
            schema.prepare_schema(connection)
            command.upgrade(schema.alembic_config(connection), target)
    finally:
        engine.dispose()


# -- the file ----------------------------------------------------------------------------------

def test_stored_sql_is_what_alembic_renders_now() -> None:
    rendered = schema.render_head_sql()
    stored = schema.HEAD_SQL.read_text(encoding="utf-8")
    assert stored == rendered, (
        f"{schema.HEAD_SQL.name} is out of date with migrations/versions: regenerate it with "
        f"`{REGENERATE}` (from the checkout) and commit it")


def test_stored_sql_is_env_pys_offline_output(capsys: pytest.CaptureFixture[str]) -> None:
    # `alembic upgrade head --sql` through migrations/env.py renders with the named paramstyle:
    # pyformat would double every `%` of op.execute text (0002's `format('...%I...')` would
    # come out `%%I`, a different function).
    command.upgrade(schema.alembic_config(), "head", sql=True)
    by_env_py = capsys.readouterr().out
    assert by_env_py == schema.HEAD_SQL.read_text(encoding="utf-8")


def test_stored_sql_stamps_the_head_in_one_transaction() -> None:
    text = schema.HEAD_SQL.read_text(encoding="utf-8")
    assert text.startswith("BEGIN;") and text.rstrip().endswith("COMMIT;")
    assert text.count("BEGIN;") == 1 and text.count("COMMIT;") == 1
    assert "CREATE TABLE cdc_sync.alembic_version" in text
    assert f"SET version_num='{head_revision()}'" in text
    body = schema.head_sql(head_revision())
    assert body is not None
    assert not body.startswith(b"BEGIN;") and not body.endswith(b"COMMIT;")
    assert b"%I" in body and b"%%" not in body


def test_a_file_for_another_revision_is_not_used(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    text = schema.HEAD_SQL.read_text(encoding="utf-8")
    stale = tmp_path / "schema_head.sql"
    stale.write_text(re.sub(r"SET version_num='[^']+'", "SET version_num='0001'", text))
    monkeypatch.setattr(schema, "HEAD_SQL", stale)
    schema.head_sql.cache_clear()
    try:
        assert schema.head_sql(head_revision()) is None
        assert schema.head_sql("0001") is not None
        monkeypatch.setattr(schema, "HEAD_SQL", tmp_path / "missing.sql")
        schema.head_sql.cache_clear()
        assert schema.head_sql(head_revision()) is None
    finally:
        schema.head_sql.cache_clear()


def test_render_command_checks_and_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "schema_head.sql"
    monkeypatch.setattr(schema, "HEAD_SQL", target)
    assert schema.main(["--render-head-sql", "--check"]) == 1
    assert not target.exists()
    assert schema.main(["--render-head-sql"]) == 0
    assert target.read_text(encoding="utf-8") == schema.render_head_sql()
    assert schema.main(["--render-head-sql", "--check"]) == 0
    assert "current" in capsys.readouterr().out


# -- against PostgreSQL ------------------------------------------------------------------------

CATALOG_QUERIES = {
    "relations": """
        SELECT c.relname, c.relkind, c.relpersistence, obj_description(c.oid, 'pg_class')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'cdc_sync' ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid),
               col_description(c.oid, a.attnum)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'cdc_sync' AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid),
               k.condeferrable, k.condeferred
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'cdc_sync' ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'cdc_sync' ORDER BY 1, 2""",
    "sequences": """
        SELECT s.relname, format_type(q.seqtypid, NULL), q.seqstart, q.seqincrement, q.seqmax,
               q.seqmin, q.seqcache, q.seqcycle, t.relname, a.attname
        FROM pg_sequence q JOIN pg_class s ON s.oid = q.seqrelid
        JOIN pg_namespace n ON n.oid = s.relnamespace
        LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
             AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
        LEFT JOIN pg_class t ON t.oid = d.refobjid
        LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE n.nspname = 'cdc_sync' ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid),
               obj_description(p.oid, 'pg_proc')
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'cdc_sync' ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'cdc_sync' ORDER BY 1, 2""",
    "types": """
        SELECT t.typname, t.typtype FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'cdc_sync' ORDER BY 1""",
    "schema": """
        SELECT n.nspname, pg_get_userbyid(n.nspowner), n.nspacl::text,
               obj_description(n.oid, 'pg_namespace')
        FROM pg_namespace n WHERE n.nspname = 'cdc_sync'""",
    "everything in the schema": """
        SELECT count(*) FROM pg_depend d JOIN pg_namespace n ON n.oid = d.refobjid
        WHERE d.refclassid = 'pg_namespace'::regclass AND n.nspname = 'cdc_sync'""",
    "alembic_version": "SELECT version_num FROM cdc_sync.alembic_version ORDER BY 1",
}


def catalog(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {name: conn.execute(query).fetchall()
                for name, query in CATALOG_QUERIES.items()}


def dump(binaries: ServerBinaries, dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    done = subprocess.run(
        [str(binaries.program("pg_dump")), "--schema-only", "--schema=cdc_sync", "--no-owner",
         "--dbname", dsn],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
    assert done.returncode == 0, done.stderr
    # pg_dump >= 15.14 brackets its output with \restrict <random key>: not schema.
    lines = [line for line in done.stdout.splitlines()
             if not line.startswith(("\\restrict", "\\unrestrict"))]
    text = "\n".join(lines)
    assert str(params["dbname"]) not in text
    return text


def test_a_site_made_from_the_file_is_one_made_by_alembic(
        make_db: Callable[..., str], server_binaries: ServerBinaries) -> None:
    by_file = make_db("schema_sql")
    by_alembic = make_db("schema_alembic")
    assert migrate_in_a_process(by_file) == "False False"
    alembic_upgrade(by_alembic)

    expected = catalog(by_alembic)
    assert expected["alembic_version"] == [(head_revision(),)]
    assert len(expected["functions"]) == 2
    assert all("%I" in str(f[2]) or "jsonb_each" in str(f[2]) for f in expected["functions"])
    assert len(expected["relations"]) > 10
    found = catalog(by_file)
    for name in CATALOG_QUERIES:
        assert found[name] == expected[name], name

    file_dump, alembic_dump = dump(server_binaries, by_file), dump(server_binaries, by_alembic)
    assert "CREATE TABLE cdc_sync.outbox" in alembic_dump
    assert "CREATE FUNCTION cdc_sync.record_tombstone()" in alembic_dump
    assert file_dump == alembic_dump


def test_the_fresh_path_leaves_alembic_and_sqlalchemy_out(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema_sql")
    assert migrate_in_a_process(dsn) == "False False"
    assert schema_version(dsn) == head_revision()
    assert migrate_in_a_process(dsn) == "False False"  # at head: one query


def test_an_existing_empty_schema_takes_the_fresh_path(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema_sql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA cdc_sync")
    assert migrate_in_a_process(dsn) == "False False"
    assert schema_version(dsn) == head_revision()


def test_an_older_revision_is_migrated_by_alembic(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema_sql")
    alembic_upgrade(dsn, "0001")
    assert schema_version(dsn) == "0001"
    assert migrate_in_a_process(dsn) == "True True"
    assert schema_version(dsn) == head_revision()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regprocedure('cdc_sync.record_tombstone()') IS NOT NULL"
                            ).fetchone() == (True,)


def test_a_schema_with_objects_but_no_version_is_left_to_alembic(
        make_db: Callable[..., str]) -> None:
    dsn = make_db("schema_sql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA cdc_sync")
        conn.execute("CREATE FUNCTION cdc_sync.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    assert migrate_in_a_process(dsn) == "True True"
    assert schema_version(dsn) == head_revision()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT cdc_sync.mine()").fetchone() == (1,)


def test_a_failing_file_falls_back_to_alembic_and_leaves_nothing(
        make_db: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = make_db("schema_sql")
    broken = (b"CREATE SCHEMA IF NOT EXISTS cdc_sync;\n"
              b"CREATE TABLE cdc_sync.junk (x int);\n"
              b"CREATE TABLE cdc_sync.alembic_version (version_num varchar(32) PRIMARY KEY);\n"
              b"SELECT 1/0;\n")
    monkeypatch.setattr(schema, "head_sql", lambda head: broken)
    migrate_site(dsn)
    assert schema_version(dsn) == head_revision()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('cdc_sync.junk')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('cdc_sync.outbox') IS NOT NULL").fetchone() == (
            True,)


def test_a_file_that_stamps_nothing_falls_back_to_alembic(
        make_db: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = make_db("schema_sql")
    monkeypatch.setattr(schema, "head_sql",
                        lambda head: b"CREATE SCHEMA IF NOT EXISTS cdc_sync;"
                                     b" CREATE TABLE cdc_sync.junk (x int);")
    migrate_site(dsn)
    assert schema_version(dsn) == head_revision()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('cdc_sync.junk')").fetchone() == (None,)


def test_waiting_for_another_migration_then_finding_the_head(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema_sql")
    # Another session migrates (with alembic) while this one waits for the lock.
    code = ("import sys; from cdc_sync.sinks.schema import migrate_site; migrate_site(sys.argv[1]);"
            " print('alembic' in sys.modules)")
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (schema.MIGRATION_LOCK_KEY,))
        proc = subprocess.Popen([sys.executable, "-c", code, dsn], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with psycopg.connect(dsn, autocommit=True) as watcher:
            for _ in range(1200):
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())").fetchone()
                if waiting == (1,):
                    break
                assert proc.poll() is None, proc.communicate()
                watcher.execute("SELECT pg_sleep(0.05)")
            else:
                pytest.fail("the migration never waited for the lock")
        engine = schema.make_engine(dsn)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql("CREATE SCHEMA cdc_sync")
                command.upgrade(schema.alembic_config(connection), "head")
        finally:
            engine.dispose()
        holder.commit()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "False"  # found the head under the lock
    assert schema_version(dsn) == head_revision()

"""The `cdc_sync` schema in a site database: alembic migrations against a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from alembic import command
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_sync.errors import SiteError
from cdc_sync.sinks import schema
from cdc_sync.sinks.schema import head_revision, migrate_site, schema_version, site_label

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "secretpw"

# table -> column -> (udt_name, nullable)
EXPECTED: dict[str, dict[str, tuple[str, bool]]] = {
    "progress": {
        "source": ("text", False),
        "applied_lsn": ("pg_lsn", False),
        "commit_ts": ("timestamptz", True),
        "snapshot_lsn": ("pg_lsn", True),
        "updated_at": ("timestamptz", False),
    },
    "conflicts": {
        "id": ("int8", False),
        "source": ("text", False),
        "table_name": ("text", False),
        "kind": ("text", True),
        "key": ("jsonb", True),
        "local_row": ("jsonb", True),
        "incoming_row": ("jsonb", True),
        "strategy": ("text", True),
        "outcome": ("text", True),
        "lsn": ("pg_lsn", True),
        "commit_ts": ("timestamptz", True),
        "detected_at": ("timestamptz", False),
    },
    "dead_letters": {
        "id": ("int8", False),
        "source": ("text", False),
        "table_name": ("text", True),
        "op": ("text", True),
        "key": ("jsonb", True),
        "row_data": ("jsonb", True),
        "old_row": ("jsonb", True),
        "lsn": ("pg_lsn", True),
        "commit_ts": ("timestamptz", True),
        "error": ("text", True),
        "sqlstate": ("text", True),
        "created_at": ("timestamptz", False),
        "retried_at": ("timestamptz", True),
        "resolved": ("bool", False),
    },
    "tombstones": {
        "table_name": ("text", False),
        "key": ("jsonb", False),
        "deleted_at": ("timestamptz", False),
        "version": ("text", True),
        "source": ("text", True),
        "lsn": ("pg_lsn", True),
        "row_values": ("jsonb", True),
    },
    "outbox": {
        "id": ("text", False),
        "seq": ("int8", False),
        "source": ("text", False),
        "topic": ("text", False),
        "event": ("jsonb", False),
        "commit_ts": ("timestamptz", True),
        "created_at": ("timestamptz", False),
    },
    "row_versions": {
        "table_name": ("text", False),
        "key": ("jsonb", False),
        "xid": ("int8", False),
        "commit_ts": ("timestamptz", False),
        "origin": ("text", False),
    },
    "column_versions": {
        "table_name": ("text", False),
        "key": ("jsonb", False),
        "clocks": ("jsonb", False),
    },
    "sources": {
        "source": ("text", False),
        "registered_at": ("timestamptz", False),
    },
    "connector_state": {
        "connector": ("text", False),
        "delivered_seq": ("int8", False),
        "last_error": ("text", True),
        "last_error_at": ("timestamptz", True),
        "last_delivery_at": ("timestamptz", True),
    },
}

PRIMARY_KEYS = {
    "progress": ["source"],
    "conflicts": ["id"],
    "dead_letters": ["id"],
    "tombstones": ["table_name", "key"],
    "outbox": ["id"],
    "connector_state": ["connector"],
    "row_versions": ["table_name", "key"],
    "column_versions": ["table_name", "key"],
    "sources": ["source"],
}


def as_url(dsn: str) -> str:
    """The same connection as a postgresql:// URL."""
    params = conninfo_to_dict(dsn)
    user = quote(str(params.get("user", "")), safe="")
    host = quote(str(params.get("host", "")), safe="")
    port = params.get("port", "5432")
    return f"postgresql://{user}@{host}:{port}/{params['dbname']}"


def tables_in(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT table_name FROM information_schema.tables"
                            " WHERE table_schema = 'cdc_sync'").fetchall()
    return {row[0] for row in rows}


# -- without a server --------------------------------------------------------------------------

def test_script_location_is_the_checkout_migrations() -> None:
    location = schema.script_location()
    assert location == REPO / "migrations"
    assert (location / "env.py").is_file()
    assert (location / "script.py.mako").is_file()
    assert (location / "versions" / "0001_initial.py").is_file()


def test_head_revision() -> None:
    assert head_revision() == "0005"


def test_offline_sql_creates_the_schema_first(capsys: pytest.CaptureFixture[str]) -> None:
    command.upgrade(schema.alembic_config(), "head", sql=True)
    sql = capsys.readouterr().out
    assert sql.index("CREATE SCHEMA IF NOT EXISTS cdc_sync") < sql.index(
        "CREATE TABLE cdc_sync.alembic_version")
    assert "CREATE TABLE cdc_sync.outbox" in sql


@pytest.mark.parametrize(("dsn", "label"), [
    ("postgresql://u:pw@db.example:6000/grants", "db.example:6000/grants"),
    ("host=db.example port=6001 dbname=budgets password=pw", "db.example:6001/budgets"),
    ("postgresql://alice@db.example", "db.example:5432/alice"),
    ("postgresql:///x?host=/run/pg", "/run/pg:5432/x"),
])
def test_site_label(dsn: str, label: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    assert site_label(dsn) == label


def test_site_label_uses_libpq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "envhost")
    monkeypatch.setenv("PGPORT", "7000")
    monkeypatch.setenv("PGDATABASE", "envdb")
    assert site_label("user=x") == "envhost:7000/envdb"


def test_invalid_dsn() -> None:
    with pytest.raises(SiteError) as info:
        migrate_site(f"host=h password={PASSWORD} junk")
    assert PASSWORD not in str(info.value)
    assert "not a valid PostgreSQL connection string" in str(info.value)


@pytest.mark.parametrize("call", [migrate_site, schema_version])
def test_unreachable_site(call: Callable[[str], object]) -> None:
    started = time.monotonic()
    with pytest.raises(SiteError) as info:
        call(f"postgresql://u:{PASSWORD}@127.0.0.1:1/x")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "\n" not in message
    assert "127.0.0.1:1/x" in message
    assert PASSWORD not in message
    assert message.startswith("site database 127.0.0.1:1/x: cannot connect: ")


def test_unknown_host_is_one_line() -> None:
    with pytest.raises(SiteError) as info:
        migrate_site(f"postgresql://u:{PASSWORD}@no-such-host.invalid:5999/x")
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-host.invalid:5999/x" in message
    assert PASSWORD not in message


# -- against PostgreSQL ------------------------------------------------------------------------

def test_migrate_creates_everything(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    assert schema_version(dsn) is None
    migrate_site(dsn)
    assert schema_version(dsn) == head_revision()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name, udt_name, is_nullable = 'YES'"
            " FROM information_schema.columns WHERE table_schema = 'cdc_sync'"
            " AND table_name <> 'alembic_version'").fetchall()
        found: dict[str, dict[str, tuple[str, bool]]] = {}
        for table, column, udt, nullable in rows:
            found.setdefault(table, {})[column] = (udt, nullable)
        assert found == EXPECTED

        keys = conn.execute(
            "SELECT c.relname, array_agg(a.attname ORDER BY k.ord)"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum"
            " WHERE n.nspname = 'cdc_sync' AND i.indisprimary AND c.relname <> 'alembic_version'"
            " GROUP BY c.relname").fetchall()
        assert dict(keys) == PRIMARY_KEYS

        indexes = {row[0]: row[1] for row in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'cdc_sync'")}
        assert "(detected_at)" in indexes["conflicts_detected_at_idx"]
        assert "(source, seq)" in indexes["outbox_source_seq_idx"]
        assert any("UNIQUE" in d and "(seq)" in d for d in indexes.values())

        # alembic's bookkeeping lives in cdc_sync, never in the site's own schemas
        assert conn.execute("SELECT to_regclass('cdc_sync.alembic_version') IS NOT NULL"
                            ", to_regclass('public.alembic_version') IS NULL").fetchone() == (
            True, True)


def test_tables_behave(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    migrate_site(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO cdc_sync.progress (source, applied_lsn)"
                     " VALUES ('w', '0/1A2B3C4')")
        row = conn.execute("SELECT applied_lsn::text, snapshot_lsn, updated_at IS NOT NULL"
                           " FROM cdc_sync.progress").fetchone()
        assert row == ("0/1A2B3C4", None, True)
        for event_id in ("w/0/1/0", "w/0/1/1", "w/0/2/0"):
            conn.execute("INSERT INTO cdc_sync.outbox (id, source, topic, event)"
                         " VALUES (%s, 'w', 'public.t', '{}')", (event_id,))
        seqs = [r[0] for r in conn.execute("SELECT seq FROM cdc_sync.outbox ORDER BY id")]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        conn.execute("INSERT INTO cdc_sync.connector_state (connector) VALUES ('audit')")
        assert conn.execute("SELECT delivered_seq FROM cdc_sync.connector_state").fetchone() == (0,)
        conn.execute("INSERT INTO cdc_sync.dead_letters (source, error) VALUES ('w', 'boom')")
        assert conn.execute("SELECT resolved FROM cdc_sync.dead_letters").fetchone() == (False,)
        conn.execute("INSERT INTO cdc_sync.tombstones (table_name, key, deleted_at)"
                     " VALUES ('public.t', '{\"id\": 1}', now())")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO cdc_sync.tombstones (table_name, key, deleted_at)"
                         " VALUES ('public.t', '{\"id\":1}', now())")


def test_migrate_twice_is_a_no_op(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    migrate_site(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO cdc_sync.progress (source, applied_lsn) VALUES ('w', '0/10')")
    migrate_site(dsn)
    assert schema_version(dsn) == head_revision()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM cdc_sync.progress").fetchone() == (1,)


def test_url_and_key_value_dsns(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    url = as_url(dsn)
    key_value = make_conninfo("", **conninfo_to_dict(dsn))
    assert url.startswith("postgresql://") and "=" in key_value
    migrate_site(url)
    assert schema_version(key_value) == head_revision()


def test_existing_empty_schema_is_fine(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA cdc_sync")
    assert schema_version(dsn) is None
    migrate_site(dsn)
    assert schema_version(dsn) == head_revision()


def test_concurrent_migrations_in_processes(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    code = "import sys; from cdc_sync.sinks.schema import migrate_site; migrate_site(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    # Hold the migration lock so that every process is certainly waiting on it at once.
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (schema.MIGRATION_LOCK_KEY,))
        procs = [subprocess.Popen([sys.executable, "-c", code, dsn], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        deadline = time.monotonic() + 60
        with psycopg.connect(dsn, autocommit=True) as watcher:
            while True:
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())").fetchone()
                if waiting == (len(procs),):
                    break
                assert time.monotonic() < deadline, "migrations never reached the lock"
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                time.sleep(0.05)
    # the holder's transaction ended: they all proceed, one after the other
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert schema_version(dsn) == head_revision()
    assert tables_in(dsn) == {*EXPECTED, "alembic_version"}


def test_concurrent_migrations_in_threads(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            migrate_site(dsn)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert schema_version(dsn) == head_revision()


def test_downgrade_and_upgrade_again(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    migrate_site(dsn)
    engine = schema.make_engine(dsn)
    try:
        with engine.begin() as connection:
            command.downgrade(schema.alembic_config(connection), "base")
    finally:
        engine.dispose()
    assert tables_in(dsn) == {"alembic_version"}
    assert schema_version(dsn) is None
    migrate_site(dsn)
    assert tables_in(dsn) == {*EXPECTED, "alembic_version"}


def test_missing_database_is_named(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    params = conninfo_to_dict(dsn)
    missing = make_conninfo(dsn, dbname="no_such_db_here", password=PASSWORD)
    for call in (migrate_site, schema_version):
        with pytest.raises(SiteError) as info:
            call(missing)
        message = str(info.value)
        assert "\n" not in message
        assert f"{params['host']}:{params.get('port', '5432')}/no_such_db_here" in message
        assert 'database "no_such_db_here" does not exist' in message
        assert PASSWORD not in message


def test_unknown_revision_in_the_database(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    migrate_site(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE cdc_sync.alembic_version SET version_num = '9999'")
    with pytest.raises(SiteError) as info:
        migrate_site(dsn)
    message = str(info.value)
    assert "cannot migrate the cdc_sync schema" in message and "9999" in message
    assert "\n" not in message


def test_permission_denied_is_a_site_error(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    role = f"cdc_sync_weak_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'REVOKE CREATE ON DATABASE "{conninfo_to_dict(dsn)["dbname"]}" FROM PUBLIC')
    try:
        with pytest.raises(SiteError) as info:
            migrate_site(make_conninfo(dsn, user=role))
        message = str(info.value)
        assert "cannot migrate the cdc_sync schema: permission denied" in message
        assert "[42501]" in message
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


# -- packaging ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_wheel_ships_the_migrations(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("cdc_sync-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for name in ("cdc_sync/_migrations/env.py", "cdc_sync/_migrations/script.py.mako",
                 "cdc_sync/_migrations/versions/0001_initial.py",
                 "cdc_sync/_migrations/versions/0002_tombstone_trigger.py",
                 "cdc_sync/_migrations/versions/0003_row_versions.py",
                 "cdc_sync/_migrations/versions/0004_column_versions.py",
                 "cdc_sync/_migrations/versions/0005_sources.py",
                 "cdc_sync/sinks/schema.py", "cdc_sync/sinks/schema_head.sql"):
        assert name in names
    # Installed, the package finds its migrations inside itself.
    site = tmp_path / "site"
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]);"
         "from cdc_sync.sinks import schema;"
         "print(schema.__file__); print(schema.script_location()); print(schema.head_revision());"
         "print(schema.head_sql(schema.head_revision()) is not None);"
         "from cdc_sync.protocol import _decode; print(_decode._fast_row is not None)",
         str(site)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module, location, head, has_head_sql, c_decoder = probe.stdout.split()
    assert module.startswith(str(site))
    assert location == str(site / "cdc_sync" / "_migrations")
    assert head == "0005"
    assert has_head_sql == "True"
    # With a compiler (CI has one), the wheel carries the C decoder and the package uses it.
    if shutil.which("cc") or shutil.which("gcc"):
        assert any(n.startswith("cdc_sync/protocol/_speedups.") and n.endswith((".so", ".pyd"))
                   for n in names)
        assert not wheel.name.endswith("-py3-none-any.whl")
        assert c_decoder == "True"


@pytest.mark.slow
def test_without_a_compiler_the_wheel_is_pure_python(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "CC": "/bin/false"})
    assert build.returncode == 0, build.stderr[-3000:]
    assert "the C decoder was not built" in build.stdout + build.stderr
    (wheel,) = out.glob("cdc_sync-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith((".so", ".pyd"))]
        assert "cdc_sync/protocol/_speedups.c" in archive.namelist()


# -- the cheap path ----------------------------------------------------------------------------

def test_light_head_revision_is_alembics() -> None:
    assert schema.light_head_revision() == head_revision()


def test_light_head_revision_gives_up_on_what_it_cannot_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    monkeypatch.setattr(schema, "script_location", lambda: tmp_path)
    cases = {
        "chain": (['revision = "a"\ndown_revision = None\n',
                   'revision = "b"\ndown_revision = "a"\n'], "b"),
        "two heads": (['revision = "a"\ndown_revision = None\n',
                       'revision = "b"\ndown_revision = "a"\n',
                       'revision = "c"\ndown_revision = "a"\n'], None),
        "a merge": (['revision = "a"\ndown_revision = None\n',
                     'revision = "b"\ndown_revision = ("a", "x")\n'], None),
        "computed": (['revision = "a"\ndown_revision = None\n',
                      'revision = REV\ndown_revision = "a"\n'], None),
        "unknown parent": (['revision = "a"\ndown_revision = "zz"\n'], None),
    }
    for name, (files, expected) in cases.items():
        for old in versions.iterdir():
            old.unlink()
        for i, text in enumerate(files):
            (versions / f"{i:04d}_x.py").write_text(text)
        schema.light_head_revision.cache_clear()
        assert schema.light_head_revision() == expected, name
    schema.light_head_revision.cache_clear()


# Imported only by the verbs (or the views) that use them, never by `import cdc_sync.cli`.
LAZY_MODULES = ('alembic', 'sqlalchemy', 'cdc_sync.pipeline', 'cdc_sync.connectors',
                'cdc_sync.connectors.runner', 'cdc_sync.metrics', 'cdc_sync.events',
                'cdc_sync.ui', 'cdc_sync.demo', 'cdc_sync.resolve', 'cdc_sync.sinks.worker',
                'httpx', 'http.server', 'rich.progress', 'rich.live', 'rich.markdown',
                'typer.rich_utils')


def test_cli_import_leaves_alembic_and_the_pipeline_out() -> None:
    code = ("import sys, cdc_sync.cli; "
            f"print(sorted(m for m in {LAZY_MODULES!r} if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_a_site_at_head_is_checked_without_alembic(make_db: Callable[..., str]) -> None:
    dsn = make_db("schema")
    code = ("import gc, sys; from cdc_sync.sinks.schema import migrate_site; "
            "migrate_site(sys.argv[1]); "
            "print('alembic' in sys.modules, 'sqlalchemy' in sys.modules, gc.get_freeze_count() > 0)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}

    def probe() -> str:
        done = subprocess.run([sys.executable, "-c", code, dsn], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    # A fresh site is made from schema_head.sql (see test_schema_sql.py): no alembic either.
    assert probe() == "False False False"
    assert schema_version(dsn) == head_revision()
    # At head: one psycopg query, alembic and SQLAlchemy never imported.
    assert probe() == "False False False"
    with psycopg.connect(dsn, autocommit=True) as conn:
        # As a site of the previous release looks.
        conn.execute("DROP TABLE cdc_sync.row_versions, cdc_sync.column_versions, "
                     "cdc_sync.sources")
        conn.execute("ALTER TABLE cdc_sync.tombstones DROP COLUMN row_values")
        conn.execute("UPDATE cdc_sync.alembic_version SET version_num = '0002'")
    # Behind: alembic upgrades it (and then keeps its objects from the collector's walks).
    assert probe() == "True True True"
    assert schema_version(dsn) == head_revision()

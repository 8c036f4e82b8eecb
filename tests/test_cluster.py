"""Throwaway clusters against real PostgreSQL servers (15 from the system, 16 from pgserver)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cdc_sync.embedded import (
    Cluster,
    ClusterError,
    ServerBinaries,
    default_server,
    find_server_binaries,
)
from cdc_sync.embedded import cluster as cluster_module


def test_settings_and_version(cluster: Cluster, server_binaries: ServerBinaries) -> None:
    assert cluster.port != 5432
    assert cluster.dsn() == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    assert cluster.major == server_binaries.major
    with psycopg.connect(cluster.dsn()) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level',"
                " 'track_commit_timestamp', 'max_replication_slots', 'max_wal_senders',"
                " 'listen_addresses', 'fsync', 'synchronous_commit', 'max_connections',"
                " 'unix_socket_directories', 'server_version_num')"
            ).fetchall()
        )
        user = conn.execute("SELECT current_user").fetchone()
    assert settings["wal_level"] == "logical"
    assert settings["track_commit_timestamp"] == "on"
    assert settings["max_replication_slots"] == "20"
    assert settings["max_wal_senders"] == "20"
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["fsync"] == "off"
    assert settings["synchronous_commit"] == "on"
    assert settings["max_connections"] == "200"
    assert settings["unix_socket_directories"] == str(cluster.socket_dir)
    assert int(settings["server_version_num"]) // 10000 == server_binaries.major
    assert user == ("postgres",)
    # the Unix socket in the cluster's own directory works too
    with psycopg.connect(
        host=str(cluster.socket_dir), port=cluster.port, user="postgres", dbname="postgres"
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_make_db_gives_isolated_databases(make_db: Callable[..., str], cluster: Cluster) -> None:
    first, second = make_db("iso"), make_db("iso")
    assert first != second
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("CREATE TABLE only_here (id int PRIMARY KEY)")
        conn.execute("INSERT INTO only_here VALUES (1)")
        name = conn.execute("SELECT current_database()").fetchone()
    assert name is not None and name[0].startswith("iso_") and first.endswith("/" + name[0])
    with psycopg.connect(second, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
        conn.execute("CREATE TABLE only_here (id int PRIMARY KEY)")  # no clash
    assert cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", params=(name[0],))


def test_drop_database_despite_active_walsender_and_slot(cluster: Cluster) -> None:
    dsn = cluster.create_database("dropme_busy")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("CREATE PUBLICATION p FOR ALL TABLES")
            conn.execute("SELECT pg_create_logical_replication_slot('busy_slot', 'pgoutput')")
            conn.execute("SELECT pg_create_logical_replication_slot('idle_slot', 'pgoutput')")
        repl = psycopg.connect(dsn, replication="database", autocommit=True)
        result = repl.pgconn.exec_(
            b"START_REPLICATION SLOT busy_slot LOGICAL 0/0"
            b" (proto_version '1', publication_names 'p')"
        )
        assert result.status == psycopg.pq.ExecStatus.COPY_BOTH
        idle = psycopg.connect(dsn)  # an idle session with an open transaction
        idle.execute("SELECT 1")
        active = cluster.execute(
            "SELECT slot_name, active FROM pg_replication_slots WHERE database = 'dropme_busy'"
            " ORDER BY 1"
        )
        assert active == [("busy_slot", True), ("idle_slot", False)]
        cluster.drop_database("dropme_busy")
        assert cluster.execute("SELECT 1 FROM pg_database WHERE datname = 'dropme_busy'") == []
        assert (
            cluster.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name IN ('busy_slot', 'idle_slot')"
            )
            == []
        )
        repl.close()
        idle.close()
    finally:
        cluster.drop_database("dropme_busy")  # no error when it is already gone


def test_kill_then_start_recovers_committed_data(
    make_cluster: Callable[..., Cluster], server_binaries: ServerBinaries
) -> None:
    crashing = make_cluster()
    assert crashing.major == server_binaries.major
    port, dsn = crashing.port, crashing.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
    open_tx = psycopg.connect(dsn)
    open_tx.execute("INSERT INTO t VALUES (-1, 'never committed')")
    crashing.kill()
    assert not crashing.is_running()
    with pytest.raises(psycopg.OperationalError):
        open_tx.execute("SELECT 1")
    open_tx.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2).close()

    crashing.start()
    assert crashing.is_running() and crashing.port == port
    assert crashing.execute("SELECT count(*), min(id), max(id) FROM t") == [(1000, 1, 1000)]
    assert "database system was interrupted" in crashing.log_path.read_text()
    crashing.kill()  # twice in a row works as well
    crashing.start()
    assert crashing.execute("SELECT count(*) FROM t") == [(1000,)]


def test_stop_start_restart_keep_port(make_cluster: Callable[..., Cluster]) -> None:
    server = make_cluster(settings={"max_connections": "50"})
    port = server.port
    server.execute("CREATE TABLE t AS SELECT 1 AS x")
    server.stop()
    assert not server.is_running()
    server.stop()  # no-op
    server.start()
    server.start()  # no-op
    server.restart()
    assert server.port == port
    assert server.execute("SELECT x FROM t") == [(1,)]
    assert server.execute("SHOW max_connections") == [("50",)]


def test_context_manager_destroys_and_initdb_without_template(
    server_binaries: ServerBinaries, cluster_base_dir: Path | None
) -> None:
    with Cluster.create(cluster_base_dir, binaries=server_binaries, template=False) as fresh:
        root = fresh.root
        assert fresh.datadir.is_dir() and fresh.is_running()
        assert fresh.execute("SHOW server_encoding") == [("UTF8",)]
        assert fresh.execute(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()"
        ) == [("C",)]
    assert not root.exists()
    fresh.destroy()  # idempotent
    with pytest.raises(ClusterError):
        fresh.start()


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    base = tmp_path / "clusters"
    base.mkdir()
    base.chmod(0o755)
    if not cluster_module._reachable(base, cluster_module._runner()):
        base = Path(tempfile.mkdtemp(prefix="cdc_sync-test-"))
        base.chmod(0o755)
    try:
        with pytest.raises(ClusterError, match=r"did not start.*shared_buffers"):
            Cluster.create(base, settings={"shared_buffers": "plenty"})
        assert list(base.iterdir()) == []  # nothing left behind
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unreachable_base_dir_is_reported(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to another user")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ClusterError, match="cannot reach"):
        Cluster.create(private / "sub")


def test_port_in_use(
    cluster: Cluster, cluster_base_dir: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ClusterError, match="Address already in use"):
        Cluster.create(cluster_base_dir, binaries=cluster.binaries, port=cluster.port)
    # a port picked for us that was taken in the meantime: another one is tried
    ports = iter([cluster.port])
    real = cluster_module._free_port
    monkeypatch.setattr(cluster_module, "_free_port", lambda: next(ports, None) or real())
    with Cluster.create(cluster_base_dir, binaries=cluster.binaries) as other:
        assert other.port != cluster.port
        assert other.execute("SELECT 1") == [(1,)]


def test_pgserver_in_a_private_directory_is_copied_for_postgres(
    pg_servers: dict[int, ServerBinaries], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root, pgserver inside a mode-700 directory (a virtualenv under /root) is copied to
    a cache the ``postgres`` user can read, and the cluster runs from there."""
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to another user")
    bundled = cluster_module._pgserver_bindir()
    if bundled is None:
        pytest.skip("the pgserver package is not installed")
    site = bundled.parents[2]
    private = Path(tempfile.mkdtemp(prefix="cdc_sync-private-"))  # mode 700, like /root
    cache = Path(tempfile.mkdtemp(prefix="cdc_sync-cache-"))
    cache.chmod(0o755)
    try:
        for part in (
            "pgserver/pginstall/bin",
            "pgserver/pginstall/lib",
            "pgserver/pginstall/share",
            "pgserver.libs",
        ):
            shutil.copytree(site / part, private / part, symlinks=True)
        hidden = cluster_module._binaries_at(private / "pgserver/pginstall/bin", "pgserver")
        assert hidden is not None
        monkeypatch.setenv("CDC_SYNC_CACHE_DIR", str(cache / "c"))
        with Cluster.create(binaries=hidden, template=False) as server:
            assert server.binaries.bindir.is_relative_to(cache)
            assert server.execute("SELECT current_setting('server_version_num')::int / 10000") == [
                (hidden.major,)
            ]
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="port"):
        Cluster.create(settings={"port": "5433"})
    with pytest.raises(ValueError, match="setting name"):
        Cluster.create(settings={"bad name": "1"})


def test_find_server_binaries_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    found = find_server_binaries()
    assert found, "no PostgreSQL server at all"
    for binaries in found:
        assert (binaries.bindir / "initdb").is_file() and binaries.major >= 10
        assert str(binaries.major) == binaries.version.split(".")[0]
    system = [b for b in found if b.origin == "system"]
    if system:
        assert default_server() == max(system, key=lambda b: b.major)
    chosen = found[-1]
    monkeypatch.setenv("CDC_SYNC_PG_BINDIR", str(chosen.bindir))
    assert default_server().bindir == chosen.bindir
    assert default_server().origin == "env"
    assert find_server_binaries()[0].origin == "env"
    monkeypatch.setenv("CDC_SYNC_PG_BINDIR", "/nonexistent/bin")
    with pytest.raises(ClusterError, match="CDC_SYNC_PG_BINDIR"):
        default_server()


def test_dsn_quotes_names(cluster: Cluster) -> None:
    assert cluster.dsn("a b/c", user="u@x").endswith(f"u%40x@127.0.0.1:{cluster.port}/a%20b%2Fc")

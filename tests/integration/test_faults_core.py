"""Robustness of the core pipeline: killed replicator processes, terminated connections,
SIGTERM, and exactly-once apply checked with tables where a duplicate apply would add rows.

Every test ends the same way: the source goes quiet, the sites catch up, and every table is
identical on every site (keyless REPLICA IDENTITY FULL tables included, so a transaction
applied twice or lost shows as a row count difference).
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cdc_sync import commands
from cdc_sync.embedded import Cluster
from cdc_sync.protocol import Commit, Lsn, decode_message

from .conftest import Env
from .helpers import (
    CliProcess,
    assert_converged,
    assert_same_tables,
    connect,
    dbname,
    execute,
    progress_lsn,
    running_pipeline,
    scalar,
    slot_row,
    wait_for,
    wait_until_caught_up,
    write_config,
)

PGBENCH_TABLES = ["public.pgbench_accounts", "public.pgbench_branches",
                  "public.pgbench_history", "public.pgbench_tellers"]


def _pgbench(cluster: Cluster) -> Path:
    for candidate in (cluster.binaries.program("pgbench"),
                      Path("/usr/lib/postgresql/15/bin/pgbench")):
        if candidate.exists():
            return candidate
    pytest.skip("pgbench is not installed")


def _pgbench_args(cluster: Cluster, dsn: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", dbname(dsn)]


# -- a writer of small transactions, each leaving a trace in a keyless table --------------

LEDGER_TABLES = [
    "CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL, touched int DEFAULT 0)",
    "CREATE TABLE ledger (tx int, acct int, delta bigint, note text)",  # no key at all
    "ALTER TABLE ledger REPLICA IDENTITY FULL",
    "CREATE TABLE bulk (tx int, n int)",  # keyless too, only ever inserted into
    "ALTER TABLE bulk REPLICA IDENTITY FULL",
    "INSERT INTO acct SELECT g, 0 FROM generate_series(1, 500) g",
]
LEDGER_NAMES = ["public.acct", "public.ledger", "public.bulk"]


class Writer:
    """Transactions until stopped: move money between accounts and log each move in the
    keyless `ledger` (identical rows possible). Every `big_every`th transaction is a big one
    instead, inserting `big_rows` rows into the keyless `bulk` (applied in chunks)."""

    def __init__(self, dsn: str, *, big_every: int = 25, big_rows: int = 8000,
                 pause: float = 0.0) -> None:
        self.dsn = dsn
        self.big_every = big_every
        self.big_rows = big_rows
        self.pause = pause
        self.count = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def _run(self) -> None:
        rng = random.Random(11)
        try:
            with connect(self.dsn) as conn:
                while not self._stop.is_set():
                    n = self.count + 1
                    with conn.transaction():
                        if self.big_every and n % self.big_every == 0:
                            conn.execute("INSERT INTO bulk SELECT %s, g "
                                         "FROM generate_series(1, %s) g", (n, self.big_rows))
                            conn.execute("UPDATE acct SET touched = touched + 1")
                        else:
                            a, b = rng.randint(1, 500), rng.randint(1, 500)
                            amount = rng.randint(1, 100)
                            conn.execute("UPDATE acct SET balance = balance - %s WHERE id = %s",
                                         (amount, a))
                            conn.execute("UPDATE acct SET balance = balance + %s WHERE id = %s",
                                         (amount, b))
                            # the same row twice: a duplicate must stay a duplicate
                            conn.execute("INSERT INTO ledger VALUES (%s, %s, %s, 'move'), "
                                         "(%s, %s, %s, 'move')",
                                         (n, a, -amount, n, a, -amount))
                            if n % 7 == 0:
                                conn.execute("DELETE FROM ledger WHERE ctid = (SELECT ctid "
                                             "FROM ledger WHERE tx = %s LIMIT 1)", (n - 3,))
                    self.count = n
                    if self.pause:
                        time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def abort(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors

    def wait_for(self, count: int, timeout: float = 30) -> None:
        wait_for(lambda: self.count >= count or bool(self.errors), timeout,
                 f"{count} writer transactions")
        assert not self.errors, self.errors


@contextmanager
def cli_run(config: Path) -> Iterator[CliProcess]:
    proc = CliProcess(config).start()
    try:
        yield proc
    finally:
        proc.close()


def _assert_ledger_exact(source: str, sites: list[str]) -> None:
    """Row counts of the keyless tables: a transaction applied twice adds rows."""
    for table in ("ledger", "bulk"):
        expected = scalar(source, f"SELECT count(*) FROM {table}")
        for site in sites:
            got = scalar(site, f"SELECT count(*) FROM {table}")
            assert got == expected, f"{table} on {dbname(site)}: {got} rows, source {expected}"


# -- (a) pgbench while the replicator process is SIGKILLed -----------------------------------

def test_pgbench_with_replicator_sigkilled(env: Env, cluster: Cluster, tmp_path: Path) -> None:
    pgbench = _pgbench(cluster)
    subprocess.run([str(pgbench), "-i", "-s", "1", "-q", *_pgbench_args(cluster, env.source)],
                   check=True, capture_output=True, timeout=120)
    execute(env.source, "ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
    data = env.settings_dict()
    config = write_config(tmp_path / "cdc-sync.toml", data)
    settings = env.settings()
    report = commands.init(settings)
    assert report.copied["site1"] >= 100_000

    rng = random.Random()
    duration = 15
    kills = sorted(rng.uniform(1.0, duration - 2.0) for _ in range(3))
    with cli_run(config) as proc:
        bench = subprocess.Popen(
            [str(pgbench), "-n", "-c", "2", "-j", "1", "-T", str(duration), "-R", "400",
             *_pgbench_args(cluster, env.source)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        try:
            for at in kills:
                time.sleep(max(0.0, started + at - time.monotonic()))
                assert proc.alive(), proc.stderr()
                proc.kill()
                time.sleep(rng.uniform(0.0, 0.5))
                proc.start()
            out, err = bench.communicate(timeout=duration + 60)
        finally:
            if bench.poll() is None:
                bench.kill()
        assert bench.returncode == 0, err
        assert scalar(env.source, "SELECT count(*) FROM pgbench_history") > 500
        wait_until_caught_up(settings, timeout=90)
        assert proc.alive(), proc.stderr()
        assert proc.terminate() == 0, proc.stderr()
    assert proc.starts == 4
    assert_same_tables(env.source, env.sites, PGBENCH_TABLES, min_rows=1)
    history = scalar(env.source, "SELECT count(*) FROM pgbench_history")
    for site in env.sites:
        assert scalar(site, "SELECT count(*) FROM pgbench_history") == history
        assert scalar(site, "SELECT sum(abalance) FROM pgbench_accounts") == \
            scalar(env.source, "SELECT sum(abalance) FROM pgbench_accounts")


# -- (b) connections terminated on the source and on the sites ------------------------------

def _terminate_walsender(source: str, slot: str) -> int:
    with connect(source) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(r.pid) FROM pg_stat_replication r "
            "JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
            (slot,)).fetchall()
    return sum(1 for r in rows if r[0])


def _terminate_site_backends(site: str) -> int:
    with connect(site) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'cdc_sync%%' "
            "AND pid <> pg_backend_pid()").fetchall()
    return sum(1 for r in rows if r[0])


def _site_backends(site: str) -> int:
    return int(scalar(site, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND application_name LIKE 'cdc_sync%%'"))


def test_terminated_connections_mid_load(env: Env) -> None:
    execute(env.source, *LEDGER_TABLES)
    settings = env.settings()
    slot = settings.source.slot
    commands.init(settings)
    writer = Writer(env.source, pause=0.002).start()
    try:
        with running_pipeline(settings) as pipe:
            for round_ in range(3):
                writer.wait_for(writer.count + 30)
                wait_for(lambda: bool(slot_row(env.source, slot)["active"]),  # type: ignore[index]
                         30, "the walsender")
                assert _terminate_walsender(env.source, slot) == 1
                writer.wait_for(writer.count + 30)
                site = env.sites[round_ % 2]
                wait_for(lambda s=site: _site_backends(s) > 0, 30, "a site connection")
                assert _terminate_site_backends(site) >= 1
                if round_ == 2:  # both sites and the source at once
                    _terminate_site_backends(env.sites[0])
                    _terminate_walsender(env.source, slot)
            writer.wait_for(writer.count + 30)
            writer.stop()
            assert_converged(settings, pipe, timeout=90, min_rows=1)
            _assert_ledger_exact(env.source, env.sites)
    finally:
        writer.abort()


# -- (c) SIGTERM -------------------------------------------------------------------------------

def _peek_commits(source: str, slot: str, publication: str) -> list[Lsn]:
    """End LSNs of the transactions the slot would send again (it is not consumed)."""
    with connect(source) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)", (slot, publication)).fetchall()
    out: list[Lsn] = []
    for (data,) in rows:
        msg = decode_message(bytes(data))
        if isinstance(msg, Commit):
            out.append(msg.end_lsn)
    return out


def test_sigterm_exits_zero_and_confirms_what_the_sites_applied(
        env: Env, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    offices = make_cluster()  # sites elsewhere: their writes are not WAL of the source
    sites = [offices.create_database("berlin"), offices.create_database("tokyo")]
    execute(env.source, *LEDGER_TABLES)
    data = env.settings_dict(sites=sites)
    config = write_config(tmp_path / "cdc-sync.toml", data)
    settings = env.settings(sites=sites)
    slot, pub = settings.source.slot, settings.source.publication
    commands.init(settings)

    # 1. idle source: after SIGTERM the slot is confirmed exactly where the sites are
    with cli_run(config) as proc:
        writer = Writer(env.source, big_every=0).start()
        writer.wait_for(100)
        writer.stop()
        wait_until_caught_up(settings, timeout=60)
        started = time.monotonic()
        assert proc.terminate(timeout=30) == 0, proc.stderr()
        assert time.monotonic() - started < 15
    wait_for(lambda: not slot_row(env.source, slot)["active"], 10,  # type: ignore[index]
             "the slot to be released")
    applied = [progress_lsn(site, "hq") for site in sites]
    confirmed = Lsn.parse(slot_row(env.source, slot)["confirmed_flush_lsn"])  # type: ignore[index]
    assert all(a is not None for a in applied)
    assert confirmed == min(a for a in applied if a is not None) or (
        confirmed > max(a for a in applied if a is not None)
        and not _peek_commits(env.source, slot, pub)), (confirmed, applied)
    assert _peek_commits(env.source, slot, pub) == []  # nothing applied is sent again

    # 2. SIGTERM in the middle of a load (big transactions included)
    writer = Writer(env.source, big_every=10, big_rows=20000).start()
    try:
        with cli_run(config) as proc:
            writer.wait_for(writer.count + 25)
            assert proc.terminate(timeout=60) == 0, proc.stderr()
    finally:
        writer.stop()
    wait_for(lambda: not slot_row(env.source, slot)["active"], 10,  # type: ignore[index]
             "the slot to be released")
    applied = [progress_lsn(site, "hq") for site in sites]
    low = min(a for a in applied if a is not None)
    confirmed = Lsn.parse(slot_row(env.source, slot)["confirmed_flush_lsn"])  # type: ignore[index]
    assert confirmed >= low, (confirmed, applied)
    assert all(end > low for end in _peek_commits(env.source, slot, pub)), \
        "a transaction every site applied is still in the slot"
    # nothing was lost: a new run brings every site up to date, exactly once
    with cli_run(config) as proc:
        wait_until_caught_up(settings, timeout=90)
        assert proc.terminate(timeout=30) == 0, proc.stderr()
    assert_same_tables(env.source, sites, LEDGER_NAMES, min_rows=1)
    _assert_ledger_exact(env.source, sites)


# -- (d) exactly once across SIGKILLs --------------------------------------------------------

def test_exactly_once_across_sigkills(env: Env, tmp_path: Path) -> None:
    execute(env.source, *LEDGER_TABLES,
            "INSERT INTO ledger SELECT 0, g, 0, 'snap' FROM generate_series(1, 100) g",
            "INSERT INTO ledger SELECT 0, g, 0, 'snap' FROM generate_series(1, 100) g")
    config = write_config(tmp_path / "cdc-sync.toml", env.settings_dict())
    settings = env.settings()
    commands.init(settings)
    rng = random.Random()
    writer = Writer(env.source, big_every=15, big_rows=10000).start()
    try:
        with cli_run(config) as proc:
            for _ in range(4):
                writer.wait_for(writer.count + rng.randint(5, 40))
                time.sleep(rng.uniform(0.0, 0.8))
                assert proc.alive(), proc.stderr()
                proc.kill()  # possibly in the middle of applying a big transaction
                if rng.random() < 0.5:
                    writer.wait_for(writer.count + 5)  # the source moves on meanwhile
                proc.start()
            writer.wait_for(writer.count + 20)
            writer.stop()
            wait_until_caught_up(settings, timeout=90)
            assert proc.terminate(timeout=30) == 0, proc.stderr()
    finally:
        writer.abort()
    assert_same_tables(env.source, env.sites, LEDGER_NAMES, min_rows=1)
    _assert_ledger_exact(env.source, env.sites)
    # the sites' progress is where the stream ended, and the slot agrees
    applied = [progress_lsn(s, "hq") for s in env.sites]
    assert all(a is not None for a in applied)


def test_exactly_once_when_a_site_connection_dies_at_commit(env: Env) -> None:
    """The site backend is terminated over and over while big transactions are applied:
    whatever was committed (rows + progress together) is never applied again."""
    execute(env.source, *LEDGER_TABLES)
    settings = env.settings()
    commands.init(settings)
    writer = Writer(env.source, big_every=3, big_rows=5000, pause=0.01).start()
    try:
        with running_pipeline(settings) as pipe:
            deadline = time.monotonic() + 6
            kills = 0
            while time.monotonic() < deadline:
                time.sleep(random.uniform(0.05, 0.4))
                kills += _terminate_site_backends(env.sites[0])
            writer.stop()
            assert kills >= 3
            assert_converged(settings, pipe, LEDGER_NAMES, timeout=90)
    finally:
        writer.abort()
    _assert_ledger_exact(env.source, env.sites)

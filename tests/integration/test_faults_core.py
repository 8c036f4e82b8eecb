"""Robustness of the core pipeline: killed replicator processes, terminated connections,
SIGTERM, and exactly-once apply checked with tables where a duplicate apply would add rows.

Every test ends the same way: the source goes quiet, the sites catch up, and every table is
identical on every site (keyless REPLICA IDENTITY FULL tables included, so a transaction
applied twice or lost shows as a row count difference).
"""

from __future__ import annotations

import functools
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from cdc_sync import commands
from cdc_sync.config import Settings
from cdc_sync.embedded import Cluster
from cdc_sync.protocol import Commit, Lsn, decode_message

from .conftest import Env
from .helpers import (
    CliProcess,
    assert_converged,
    assert_same_tables,
    connect,
    current_lsn,
    dbname,
    execute,
    progress_lsn,
    running_pipeline,
    scalar,
    slot_row,
    wait_for,
    wait_streaming,
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
    "CREATE TABLE bulk (tx int, n int, PRIMARY KEY (tx, n))",
    "INSERT INTO acct SELECT g, 0 FROM generate_series(1, 500) g",
]
LEDGER_NAMES = ["public.acct", "public.ledger", "public.bulk"]


class Writer:
    """Transactions until stopped: move money between accounts and log each move in the
    keyless `ledger` (identical rows possible). Every `big_every`th transaction is a big one
    instead, inserting `big_rows` rows into `bulk` (applied in chunks) between two `ledger`
    rows: applied twice, even in part, it leaves extra `ledger` rows."""

    def __init__(self, dsn: str, *, big_every: int = 25, big_rows: int = 12000,
                 pause: float = 0.01) -> None:
        self.dsn = dsn
        self.big_every = big_every
        self.big_rows = big_rows
        self.pause = pause
        # transaction numbers go on from the last one in `ledger` (several writers in a row)
        self.count = int(scalar(dsn, "SELECT coalesce(max(tx), 0) FROM ledger"))
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
                            conn.execute("INSERT INTO ledger VALUES (%s, 0, 0, 'big')", (n,))
                            conn.execute("INSERT INTO bulk SELECT %s, g "
                                         "FROM generate_series(1, %s) g", (n, self.big_rows))
                            conn.execute("INSERT INTO ledger VALUES (%s, 0, 0, 'big')", (n,))
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
        except BaseException as exc:
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
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- cdc-sync run stderr (last start):\n"
                             f"{proc.stderr()[-4000:]}") from exc
    finally:
        proc.close()


def _assert_ledger_exact(source: str, sites: list[str]) -> None:
    """Row counts of the keyless table: a transaction applied twice adds rows."""
    for table in ("ledger",):
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        expected = scalar(source, query)
        for site in sites:
            got = scalar(site, query)
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
            [str(pgbench), "-n", "-c", "2", "-j", "1", "-T", str(duration), "-R", "120",
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
        assert scalar(env.source, "SELECT count(*) FROM pgbench_history") > 1000
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

def _terminate_walsender(source: str, slot: str, wait: float = 10) -> int:
    """Terminate the walsender streaming `slot` (waiting up to `wait` s for one)."""
    deadline = time.monotonic() + wait
    while True:
        with connect(source) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(r.pid) FROM pg_stat_replication r "
                "JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
                (slot,)).fetchall()
        killed = sum(1 for r in rows if r[0])
        if killed or time.monotonic() > deadline:
            return killed
        time.sleep(0.05)


def _terminate_site_backends(site: str, wait: float = 10) -> int:
    """Terminate the replicator's connections to `site` (waiting up to `wait` s for one)."""
    deadline = time.monotonic() + wait
    while True:
        with connect(site) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'cdc_sync%%' "
                "AND pid <> pg_backend_pid()").fetchall()
        killed = sum(1 for r in rows if r[0])
        if killed or time.monotonic() > deadline:
            return killed
        time.sleep(0.05)


def _site_backends(site: str) -> int:
    return int(scalar(site, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND application_name LIKE 'cdc_sync%%'"))


def _site_connected(site: str) -> bool:
    return _site_backends(site) > 0


def _wait_reconnected(settings: Settings) -> None:
    wait_streaming(settings)
    for site in settings.sites:
        wait_for(functools.partial(_site_connected, site.dsn), 30, f"a connection to {site.name}")


def test_terminated_connections_mid_load(env: Env) -> None:
    """The walsender and the site backends are terminated under load, one after the other
    and together; the replicator reconnects by itself and every site converges."""
    execute(env.source, *LEDGER_TABLES)
    settings = env.settings()
    slot = settings.source.slot
    commands.init(settings)
    writer = Writer(env.source).start()
    try:
        with running_pipeline(settings) as pipe:
            # the last step only ends the stream: whatever state the sites are in, a new
            # stream starts for everybody after it
            steps = [("source",), ("site1",), ("site2",), ("source", "site1", "site2"),
                     ("source",)]
            for step in steps:
                writer.wait_for(writer.count + 25)
                _wait_reconnected(settings)
                for target in step:
                    if target == "source":
                        assert _terminate_walsender(env.source, slot) == 1
                    else:
                        assert _terminate_site_backends(settings.site(target).dsn) >= 1
            writer.wait_for(writer.count + 25)
            writer.stop()
            assert_converged(settings, pipe, timeout=60, min_rows=1)
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


def _released_slot(settings: Settings) -> dict[str, Any]:
    slot = settings.source.slot
    wait_for(lambda: not (slot_row(settings.source.dsn, slot) or {}).get("active"), 10,
             "the slot to be released")
    row = slot_row(settings.source.dsn, slot)
    assert row is not None
    return row


def test_sigterm_exits_zero_and_confirms_what_the_sites_applied(
        env: Env, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    offices = make_cluster()  # sites elsewhere: their writes are not WAL of the source
    sites = [offices.create_database("berlin"), offices.create_database("tokyo")]
    execute(env.source, *LEDGER_TABLES)
    config = write_config(tmp_path / "cdc-sync.toml", env.settings_dict(sites=sites))
    settings = env.settings(sites=sites)
    slot, pub = settings.source.slot, settings.source.publication
    commands.init(settings)

    with cli_run(config) as proc:
        wait_streaming(settings)
        writer = Writer(env.source, big_every=10).start()
        writer.wait_for(writer.count + 100)
        writer.stop()
        wait_until_caught_up(settings, timeout=60)
        started = time.monotonic()
        assert proc.terminate(timeout=30) == 0, proc.stderr()
        assert time.monotonic() - started < 15
    confirmed = Lsn.parse(_released_slot(settings)["confirmed_flush_lsn"])
    applied = [progress_lsn(site, "hq") for site in sites]
    assert applied[0] is not None and applied[0] == applied[1]
    # the source has been idle since the last transaction the sites applied: the slot is
    # confirmed there (or just past it, at WAL of no published transaction: a keepalive or
    # a heartbeat), so nothing the sites hold would be sent again
    assert confirmed >= applied[0], (confirmed, applied)
    assert _peek_commits(env.source, slot, pub) == []
    assert confirmed <= current_lsn(env.source)

    # written while nothing runs: the next run brings it, exactly once
    writer = Writer(env.source, big_every=10).start()
    writer.wait_for(writer.count + 60)
    writer.stop()
    with cli_run(config) as proc:
        wait_until_caught_up(settings, timeout=60)
        assert proc.terminate(timeout=30) == 0, proc.stderr()
    assert_same_tables(env.source, sites, LEDGER_NAMES, min_rows=1)
    _assert_ledger_exact(env.source, sites)


def test_sigterm_under_load_exits_promptly_and_confirms(
        env: Env, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """Five SIGTERMs, each after a second of load (small transactions, and big ones in
    flight): every time the process exits 0 within 20 s and the slot is confirmed at least
    as far as every site has applied. Then nothing is lost or applied twice.

    (Regression: the final standby status used to be lost when the connection was closed
    with server data unread, and a worker whose queue was full never saw its stop.)"""
    offices = make_cluster()
    sites = [offices.create_database("berlin"), offices.create_database("tokyo")]
    execute(env.source, *LEDGER_TABLES)
    config = write_config(tmp_path / "cdc-sync.toml", env.settings_dict(sites=sites))
    settings = env.settings(sites=sites)
    commands.init(settings)
    writer = Writer(env.source, big_every=20, big_rows=8000).start()
    problems: list[str] = []
    try:
        for cycle in range(5):
            proc = CliProcess(config, tag=f"cycle{cycle}").start()
            try:
                setup_wait(functools.partial(_slot_active, settings), 30, "streaming")
                writer.wait_for(writer.count + 40)
                os_started = time.monotonic()
                try:
                    rc: int | None = proc.terminate(timeout=20)
                except subprocess.TimeoutExpired:
                    rc = None
                took = time.monotonic() - os_started
            finally:
                proc.kill()
            confirmed = Lsn.parse(_released_slot(settings)["confirmed_flush_lsn"])
            applied = [progress_lsn(site, "hq") for site in sites]
            low = min(a for a in applied if a is not None)
            if rc != 0:
                problems.append(f"cycle {cycle}: exit status {rc} after {took:.1f} s")
            if confirmed < low:
                problems.append(f"cycle {cycle}: slot confirmed {confirmed}, sites applied "
                                f"{[str(a) for a in applied]}")
            if problems:
                break
    finally:
        writer.stop()
    assert not problems, "; ".join(problems)
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
    writer = Writer(env.source, big_every=15).start()
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
    # the slot is confirmed as far as every site has applied
    applied = [progress_lsn(s, "hq") for s in env.sites]
    confirmed = Lsn.parse(slot_row(env.source, settings.source.slot)[  # type: ignore[index]
        "confirmed_flush_lsn"])
    assert confirmed >= min(a for a in applied if a is not None)


def test_exactly_once_when_a_site_connection_dies_at_commit(env: Env) -> None:
    """The site backend is terminated over and over while big transactions are applied:
    whatever was committed (rows + progress together) is never applied again."""
    execute(env.source, *LEDGER_TABLES)
    settings = env.settings()
    commands.init(settings)
    writer = Writer(env.source, big_every=4, pause=0.02).start()
    rng = random.Random()
    try:
        with running_pipeline(settings) as pipe:
            for _ in range(6):
                wait_for(lambda: _site_backends(env.sites[0]) > 0, 30, "the site connection")
                writer.wait_for(writer.count + 2)
                time.sleep(rng.uniform(0.0, 0.3))
                assert _terminate_site_backends(env.sites[0]) >= 1
            writer.wait_for(writer.count + 10)
            writer.stop()
            assert_converged(settings, pipe, LEDGER_NAMES, timeout=60)
    finally:
        writer.abort()
    _assert_ledger_exact(env.source, env.sites)


# -- reproductions of bugs outside this suite's files (see the xfail reasons) --------------------

def _slot_active(settings: Settings) -> bool:
    row = slot_row(settings.source.dsn, settings.source.slot)
    return row is not None and bool(row["active"])


def setup_wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """`wait_for`, failing with RuntimeError: a set-up failure must not pass for the bug
    (the xfail markers below expect AssertionError)."""
    try:
        wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise RuntimeError(str(exc)) from None


def test_site_back_during_source_reconnect_backoff_is_replayed(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Site connection and walsender lost together: the site's worker comes back (and asks
    for a replay) while the pipeline sleeps its reconnect backoff. The window is 0.25-0.5 s
    at first, up to 10 s after repeated failures; it is widened here (RECONNECT_INITIAL 4 s,
    as after three failed attempts) so the case is always hit.

    (Regression: the replay request was erased when the next attempt started, and the site
    waited for a reset for ever.)"""
    import cdc_sync.pipeline as pipeline_module
    monkeypatch.setattr(pipeline_module, "RECONNECT_INITIAL", 4.0)
    execute(env.source, *LEDGER_TABLES)
    settings = env.settings()
    commands.init(settings)
    writer = Writer(env.source, big_every=0).start()
    try:
        with running_pipeline(settings) as pipe:
            writer.wait_for(writer.count + 50)
            setup_wait(lambda: _site_backends(env.sites[0]) > 0, 30, "site1's connection")
            setup_wait(lambda: bool(_terminate_site_backends(env.sites[0])), 1, "a site kill")
            time.sleep(0.1)  # site1's worker notices under load, goes down for 0.25-0.5 s
            setup_wait(lambda: _terminate_walsender(env.source, settings.source.slot, 0) == 1,
                       1, "a walsender kill")
            writer.wait_for(writer.count + 100)
            writer.stop()
            assert_converged(settings, pipe, LEDGER_NAMES, timeout=20)
    finally:
        writer.abort()


def test_stream_lost_mid_transaction_while_a_site_is_blocked(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source stream is cut in the middle of a transaction (fault injection: after its
    first chunks reached the sites) while site2's worker is blocked for 8 s on a row lock a
    local session holds. The new stream session must settle site2's partial transaction
    before replaying it: nothing is applied twice.

    (Regression: the reset was queued with a 5 s timeout, and a blocked site lost it.)"""
    from cdc_sync.source import stream as stream_module

    execute(env.source, *LEDGER_TABLES)
    settings = env.settings()
    commands.init(settings)
    state = {"armed": False, "cut": False, "lost": False}
    seen = [0]  # frames read since armed
    real_read = stream_module.ReplicationStream.read_raw  # what the pipeline reads with

    def read(self: stream_module.ReplicationStream, timeout: float) -> list[Any]:
        if state["cut"] and not state["lost"]:
            state["lost"] = True
            raise stream_module.StreamLost("source: injected: replication connection lost")
        frames = real_read(self, timeout)
        if state["armed"] and not state["cut"]:
            keep = 60 - seen[0]  # about 60 frames into the 500-row transaction
            seen[0] += len(frames)
            if len(frames) > keep:
                state["cut"] = True
                return frames[:keep]
        return frames

    monkeypatch.setattr(stream_module.ReplicationStream, "read_raw", read)
    with running_pipeline(settings, chunk_size=10) as pipe:
        execute(env.source, "INSERT INTO ledger VALUES (0, 0, 0, 'first')")
        wait_until_caught_up(settings, pipeline=pipe)
        with connect(env.sites[1], autocommit=False) as blocker:
            blocker.execute("SELECT * FROM acct WHERE id = 1 FOR UPDATE")
            state["armed"] = True
            execute(env.source, "UPDATE acct SET balance = balance + 1 WHERE id = 1",
                    "INSERT INTO ledger SELECT 1, g, 1, 'big' FROM generate_series(1, 500) g")
            setup_wait(lambda: state["lost"], 30, "the injected stream loss")
            time.sleep(8)  # site2 stays blocked well past any put timeout
            blocker.rollback()
        execute(env.source, "INSERT INTO ledger VALUES (2, 0, 0, 'after')")
        assert_converged(settings, pipe, LEDGER_NAMES, timeout=60)
        _assert_ledger_exact(env.source, env.sites)

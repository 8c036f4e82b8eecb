"""`cdc-sync demo`: three offices in multi-directional sync on a PostgreSQL of their own.

Contract:
- `run_demo(seconds, console=...)` needs nothing set up: it creates one throwaway `Cluster`
  (the system's PostgreSQL or the `pgserver` wheel's; as root the server runs as `postgres`)
  with the databases `washington`, `berlin` and `tokyo`, creates a small grants schema in
  `washington` (`grants`, `budget_lines`), and runs `commands.init` for each office with the
  shape of a real deployment: office O is the source (`slot`/`publication` `cdc_sync_<O>`),
  the two other offices are its sites, conflicts are resolved last-writer-wins on commit
  timestamps (`[conflicts] strategy = "lww"`). `init` of the first office creates the tables
  at the two others.
- One `Pipeline` per office runs in a thread; writes applied by cdc-sync carry a replication
  origin and are not captured again. A writer thread per office then updates, inserts and
  deletes random grants and budget lines in the same small key space, so offices write the
  same rows concurrently and conflicts happen.
- On a terminal a Rich table refreshes in place (per office: how far the others are behind
  its changes in bytes and seconds, changes/s applied at it, conflicts, dead letters);
  otherwise a plain line is printed every few seconds.
- After `seconds` (None: until Ctrl-C / SIGTERM) the writers stop; each office commits a
  marker and the demo waits (at most `converge_timeout`) until the two other offices hold
  everything up to it; then it compares every table of the three offices in PostgreSQL's
  text form. It prints one summary line, e.g.
  `demo: 3 offices converged: 812 changes, 37 conflicts resolved, 0 dead letters,
  identical rows (42 grants, 61 budget lines)`, stops the pipelines and destroys the cluster
  (also on an error or a second Ctrl-C).
- It returns a `DemoResult`; `ok` is true only if the offices converged with identical rows
  (the CLI exits 0 then, else 1). Failures to start (no PostgreSQL here) raise `CdcSyncError`.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import psycopg
from rich.console import Console
from rich.live import Live

from . import commands
from .config import Settings, settings_from_dict
from .embedded import Cluster
from .metrics import site_lag
from .pipeline import Pipeline
from .protocol import Lsn
from .ui import OfficeRow, format_office_line, render_offices

__all__ = ["OFFICES", "DemoResult", "office_settings", "run_demo"]

log = logging.getLogger(__name__)

OFFICES: Final = ("washington", "berlin", "tokyo")
GRANT_KEYS: Final = 200         # a small key space shared by the offices: conflicts happen
BUDGET_KEYS: Final = 400
ROWS_PER_TX: Final = 24         # rows a writer's transaction changes (about; set-based)
WRITE_INTERVAL: Final = 0.012   # seconds between a writer's transactions (~1,500 rows/s each)
LIVE_REFRESH: Final = 0.5
PLAIN_REFRESH: Final = 2.0
CONVERGE_TIMEOUT: Final = 60.0
COMPARE_OPTIONS: Final = "-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3"
TABLES: Final = ("public.grants", "public.budget_lines")
MARKER_PREFIX: Final = "cdc_sync_demo"

SCHEMA: Final = (
    "CREATE TABLE grants (id int PRIMARY KEY, office text NOT NULL, title text NOT NULL, "
    "amount numeric(12,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE budget_lines (id int PRIMARY KEY, grant_id int NOT NULL, "
    "category text NOT NULL, amount numeric(12,2) NOT NULL, "
    "updated_at timestamptz NOT NULL DEFAULT now())",
)
_TITLES: Final = ("Clean water", "Rural schools", "Vaccines", "Solar microgrids", "Literacy",
                  "Reforestation", "Maternal health", "Flood defences", "Libraries", "Broadband")
_CATEGORIES: Final = ("travel", "equipment", "salaries", "training", "evaluation", "overhead")


@dataclass
class DemoResult:
    """What the demo saw; `summary` is the line it printed."""

    converged: bool
    identical: bool
    writes: int
    applied: int
    conflicts: int
    dead_letters: int
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows (at the first office)
    summary: str = ""
    problems: list[str] = field(default_factory=list)

    writer_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.converged and self.identical and not self.writer_errors


def office_settings(office: str, dsns: dict[str, str]) -> Settings:
    """The configuration of `office`'s replicator: itself as source, the others as sites."""
    return settings_from_dict({
        "source": {"name": office, "dsn": dsns[office], "slot": f"cdc_sync_{office}",
                   "publication": f"cdc_sync_{office}"},
        "sites": [{"name": o, "dsn": dsns[o]} for o in dsns if o != office],
        "conflicts": {"strategy": "lww"},
    }, origin=f"<demo {office}>")


# -- writers -----------------------------------------------------------------------------------

class Writer(threading.Thread):
    """Random grant and budget-line changes at one office until `stop` is set."""

    def __init__(self, office: str, dsn: str, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"demo-writer-{office}", daemon=True)
        self.office, self.dsn, self.stop_event = office, dsn, stop
        self.rng = random.Random(seed)
        self.writes = 0          # committed row changes
        self.deadlocks = 0       # transactions the server rolled back (retried by going on)
        self.error: str | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                 application_name=f"cdc_sync_demo_writer_{self.office}") as conn:
                while not self.stop_event.is_set():
                    try:
                        self.writes += self.step(conn)
                    except (psycopg.errors.DeadlockDetected,
                            psycopg.errors.SerializationFailure):
                        # Against an applier taking the same rows: rolled back, go on
                        # (as any application would retry).
                        self.deadlocks += 1
                    self.stop_event.wait(WRITE_INTERVAL * (0.5 + self.rng.random()))
        except psycopg.Error as exc:
            self.error = " ".join(str(exc).split())
            log.warning("demo writer %s stopped: %s", self.office, self.error)

    def step(self, conn: psycopg.Connection[Any]) -> int:
        """One transaction of about ROWS_PER_TX rows, set-based; returns the rows changed.
        Keys are sorted: rows are locked in the order the appliers lock them."""
        rng, office = self.rng, self.office
        n = rng.randint(ROWS_PER_TX // 2, ROWS_PER_TX * 3 // 2)
        gids = sorted(rng.sample(range(1, GRANT_KEYS + 1), n))
        roll = rng.random()
        with conn.transaction():
            if roll < 0.65:
                # Amounts move (existing grants), or new grants are made.
                return conn.execute(
                    "INSERT INTO grants (id, office, title, amount, updated_at) "
                    "SELECT id, %s, %s || ' #' || id, a, now() "
                    "FROM unnest(%s::int[], %s::numeric[]) AS u(id, a) "
                    "ON CONFLICT (id) DO UPDATE SET amount = grants.amount + EXCLUDED.amount "
                    "/ 100, office = EXCLUDED.office, updated_at = now()",
                    (office, rng.choice(_TITLES), gids,
                     [Decimal(rng.randint(1000, 250000)) for _ in gids])).rowcount
            if roll < 0.75:
                return conn.execute("DELETE FROM grants WHERE id = ANY(%s)",
                                    (gids[: max(1, n // 4)],)).rowcount
            # Budget lines and their grants in one transaction.
            bids = sorted(rng.sample(range(1, BUDGET_KEYS + 1), n))
            changed = conn.execute(
                "INSERT INTO budget_lines (id, grant_id, category, amount, updated_at) "
                "SELECT id, g, %s, a, now() FROM unnest(%s::int[], %s::int[], %s::numeric[]) "
                "AS u(id, g, a) ON CONFLICT (id) DO UPDATE SET amount = budget_lines.amount + "
                "EXCLUDED.amount, category = EXCLUDED.category, updated_at = now()",
                (rng.choice(_CATEGORIES), bids, gids,
                 [Decimal(rng.randint(10, 900)) for _ in bids])).rowcount
            if rng.random() < 0.15:
                changed += conn.execute("DELETE FROM budget_lines WHERE id = ANY(%s)",
                                        (bids[:3],)).rowcount
            changed += conn.execute(
                "UPDATE grants SET updated_at = now(), office = %s WHERE id = ANY(%s)",
                (office, gids)).rowcount
            return changed


# -- running pipelines -------------------------------------------------------------------------

class _PipelineThread:
    def __init__(self, office: str, settings: Settings) -> None:
        self.office = office
        self.pipeline = Pipeline(settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"demo-pipeline-{office}",
                                       daemon=True)

    def _run(self) -> None:
        try:
            self.pipeline.run()
        except BaseException as exc:  # reported in the view and the summary
            self.error = exc
            log.error("pipeline of %s stopped: %s", self.office, exc)

    def stop(self, timeout: float = 30) -> None:
        self.pipeline.stop()
        self.thread.join(timeout)


@dataclass
class _View:
    """Per-office figures between two refreshes (for changes/s)."""

    last_applied: dict[str, int] = field(default_factory=dict)
    last_time: float = 0.0


def _office_rows(pipes: dict[str, _PipelineThread], writers: dict[str, Writer],
                 view: _View) -> list[OfficeRow]:
    now_mono = time.monotonic()
    now = datetime.now(UTC)
    dt = max(1e-3, now_mono - view.last_time) if view.last_time else None
    rows = []
    for office, pt in pipes.items():
        pipe = pt.pipeline
        received = int(pipe.received_lsn)
        lag_b: int | None = 0
        lag_s: float | None = 0.0
        for w in pipe.workers:
            if w.durable_lsn is None:
                lag_b = lag_s = None
                break
            behind_bytes, behind_seconds = site_lag(received, w, now)
            lag_b = max(lag_b or 0, behind_bytes)
            lag_s = None if behind_seconds is None or lag_s is None else max(lag_s, behind_seconds)
        incoming = [w for p in pipes.values() if p is not pt for w in p.pipeline.workers
                    if w.site == office]
        applied = sum(w.applied_changes for w in incoming)
        rate = 0.0
        if dt is not None:
            rate = max(0, applied - view.last_applied.get(office, 0)) / dt
        view.last_applied[office] = applied
        errors = [pipe.last_error, *(w.last_error for w in pipe.workers)]
        error = (f"stopped: {pt.error}" if pt.error is not None
                 else next((e for e in errors if e), None))
        rows.append(OfficeRow(
            name=office, writes=writers[office].writes if office in writers else 0,
            lag_bytes=lag_b, lag_seconds=lag_s, changes_per_second=rate, applied=applied,
            conflicts=sum(w.conflicts for w in incoming),
            dead_letters=sum(w.dead_letters for w in incoming),
            connected=pipe.connected and all(w.connected for w in pipe.workers), error=error))
    view.last_time = now_mono
    return rows


@contextmanager
def _sigterm_as_interrupt(install: bool) -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C does (so the cluster is destroyed)."""
    if not install or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the demo ----------------------------------------------------------------------------------

def run_demo(seconds: float | None = None, *, console: Console | None = None,
             live: bool | None = None, base_dir: Path | None = None, seed: int | None = None,
             converge_timeout: float = CONVERGE_TIMEOUT, install_signals: bool = True,
             on_status: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo (see the module docstring); `live` defaults to "the console is a terminal".

    `on_status` receives each step ("creating PostgreSQL", "init washington", ...)."""
    console = console or Console()
    live = console.is_terminal if live is None else live
    seed = random.randrange(1 << 30) if seed is None else seed
    say = on_status or (lambda text: console.print(f"demo: {text}", markup=False,
                                                   highlight=False, soft_wrap=True))
    with _sigterm_as_interrupt(install_signals):
        say("starting PostgreSQL")
        cluster = Cluster.create(base_dir)
        pipes: dict[str, _PipelineThread] = {}
        try:
            say(f"PostgreSQL {cluster.binaries.version} on 127.0.0.1:{cluster.port}; "
                f"offices {', '.join(OFFICES)}")
            dsns = {office: cluster.create_database(office) for office in OFFICES}
            with psycopg.connect(dsns[OFFICES[0]], autocommit=True) as conn:
                for stmt in SCHEMA:
                    conn.execute(stmt)
            settings = {office: office_settings(office, dsns) for office in OFFICES}
            for office in OFFICES:
                say(f"init {office} (source) -> {', '.join(o for o in OFFICES if o != office)}")
                commands.init(settings[office])
            for office in OFFICES:
                pipes[office] = _PipelineThread(office, settings[office])
                pipes[office].thread.start()
            _seed_grants(dsns[OFFICES[0]], random.Random(seed))
            return _exercise(console, dsns, pipes, seconds=seconds, live=live, seed=seed,
                             converge_timeout=converge_timeout)
        finally:
            for pt in pipes.values():
                pt.pipeline.stop()
            for pt in pipes.values():
                pt.stop()
            cluster.destroy()


def _seed_grants(dsn: str, rng: random.Random) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for gid in range(1, GRANT_KEYS // 2 + 1):
            conn.execute("INSERT INTO grants (id, office, title, amount, updated_at) "
                         "VALUES (%s, %s, %s, %s, now())",
                         (gid, OFFICES[0], f"{rng.choice(_TITLES)} #{gid}",
                          Decimal(rng.randint(1000, 250000))))


def _exercise(console: Console, dsns: dict[str, str], pipes: dict[str, _PipelineThread], *,
              seconds: float | None, live: bool, seed: int, converge_timeout: float
              ) -> DemoResult:
    stop_writers = threading.Event()
    writers = {office: Writer(office, dsns[office], stop_writers, seed + i)
               for i, office in enumerate(OFFICES)}
    for w in writers.values():
        w.start()
    view = _View()
    started = time.monotonic()
    until = None if seconds is None else started + seconds
    hint = ("Ctrl-C to stop" if until is None
            else f"stopping after {seconds:g} s (Ctrl-C stops earlier)")
    try:
        if live:
            with Live(render_offices(_office_rows(pipes, writers, view), elapsed=0.0,
                                     footer=hint),
                      console=console, refresh_per_second=4, transient=False) as screen:
                while until is None or time.monotonic() < until:
                    time.sleep(LIVE_REFRESH)
                    screen.update(render_offices(_office_rows(pipes, writers, view),
                                                 elapsed=time.monotonic() - started, footer=hint))
        else:
            console.print(f"demo: writers running; {hint}", markup=False, highlight=False,
                          soft_wrap=True)
            _office_rows(pipes, writers, view)
            while until is None or time.monotonic() < until:
                time.sleep(PLAIN_REFRESH if until is None
                           else max(0.0, min(PLAIN_REFRESH, until - time.monotonic())))
                console.print(format_office_line(_office_rows(pipes, writers, view),
                                                 elapsed=time.monotonic() - started),
                              markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        console.print("demo: interrupted; stopping the writers", markup=False, highlight=False)
    stop_writers.set()
    for w in writers.values():
        w.join(10)
    writes = sum(w.writes for w in writers.values())
    console.print(f"demo: writers stopped after {writes} changes; waiting for the offices to "
                  "converge", markup=False, highlight=False, soft_wrap=True)
    writer_errors = [f"writer {w.office}: {w.error}" for w in writers.values() if w.error]
    problems = list(writer_errors)
    lagging = _wait_converged(dsns, pipes, converge_timeout)
    converged = not lagging
    problems += lagging
    counts, differences = _compare(dsns)
    problems += differences
    conflicts, dead = _bookkeeping(dsns)
    applied = sum(w.applied_changes for pt in pipes.values() for w in pt.pipeline.workers)
    result = DemoResult(converged=converged, identical=not differences, writes=writes,
                        applied=applied, conflicts=conflicts, dead_letters=dead,
                        rows=counts, problems=problems, writer_errors=writer_errors)
    rows_text = ", ".join(f"{n} {t.split('.', 1)[1].replace('_', ' ')}"
                          for t, n in counts.items())
    if result.ok:
        result.summary = (f"demo: {len(OFFICES)} offices converged: {writes} changes, "
                          f"{_n(conflicts, 'conflict')} resolved, {_n(dead, 'dead letter')}, "
                          f"identical rows ({rows_text})")
    else:
        state = "converged" if converged else f"did not converge within {converge_timeout:g} s"
        result.summary = (f"demo: FAILED: {len(OFFICES)} offices {state}: {writes} changes, "
                          f"{_n(conflicts, 'conflict')} resolved, {_n(dead, 'dead letter')}, "
                          f"{'identical rows' if not differences else 'rows differ'}: "
                          + "; ".join(problems))
    console.print(result.summary, markup=False, highlight=False, soft_wrap=True)
    return result


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _marker(dsn: str) -> Lsn:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_logical_emit_message(true, %s, 'converge')::text",
                           (MARKER_PREFIX,)).fetchone()
    assert row is not None
    return Lsn.parse(row[0])


def _wait_converged(dsns: dict[str, str], pipes: dict[str, _PipelineThread],
                    timeout: float) -> list[str]:
    """Wait until every office's sites hold a marker committed now at that office; return
    what is still missing after `timeout` (empty: converged)."""
    markers = {office: _marker(dsns[office]) for office in pipes}
    deadline = time.monotonic() + timeout

    def missing() -> list[str]:
        out = []
        for office, pt in pipes.items():
            if pt.error is not None:
                out.append(f"the pipeline of {office} stopped: {pt.error}")
                continue
            for w in pt.pipeline.workers:
                if w.durable_lsn is None or w.durable_lsn <= markers[office]:
                    held = "nothing" if w.durable_lsn is None else str(w.durable_lsn)
                    why = f" ({w.last_error})" if w.last_error else ""
                    out.append(f"{w.site} holds {held} of {office}, needs past "
                               f"{markers[office]}{why}")
        return out

    while True:
        left = missing()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _fingerprint(dsn: str, table: str) -> list[str]:
    schema, _, name = table.partition(".")
    query = psycopg.sql.SQL("SELECT t::text FROM {} AS t ORDER BY 1").format(
        psycopg.sql.Identifier(schema, name))
    with psycopg.connect(dsn, autocommit=True, options=COMPARE_OPTIONS) as conn:
        return [r[0] for r in conn.execute(query).fetchall()]


def _compare(dsns: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Row counts (at the first office) and a description of every table that differs."""
    counts: dict[str, int] = {}
    problems: list[str] = []
    first = OFFICES[0]
    for table in TABLES:
        rows = {office: _fingerprint(dsn, table) for office, dsn in dsns.items()}
        counts[table] = len(rows[first])
        for office in OFFICES[1:]:
            if rows[office] != rows[first]:
                only_here = set(rows[office]) - set(rows[first])
                only_there = set(rows[first]) - set(rows[office])
                example = ""
                if only_there or only_here:
                    example = (f" (e.g. {first} {min(only_there) if only_there else 'nothing'}"
                               f" vs {office} {min(only_here) if only_here else 'nothing'})")
                problems.append(
                    f"{table} differs between {first} ({len(rows[first])} rows) and {office} "
                    f"({len(rows[office])} rows): {len(only_there)} rows only at {first}, "
                    f"{len(only_here)} only at {office}{example}")
    return counts, problems


def _bookkeeping(dsns: dict[str, str]) -> tuple[int, int]:
    """Conflicts logged and unresolved dead letters, summed over the offices."""
    conflicts = dead = 0
    for dsn in dsns.values():
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM cdc_sync.conflicts), "
                "(SELECT count(*) FROM cdc_sync.dead_letters WHERE NOT resolved)").fetchone()
        if row is not None:
            conflicts += int(row[0])
            dead += int(row[1])
    return conflicts, dead


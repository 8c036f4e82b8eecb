"""The convergence checker: three offices writing the same rows at once, faults injected, and
the end state checked against the record of every committed write.

Each office is its own cluster and the source of its own `cdc-sync run` subprocess whose sites
are the two other offices (`[conflicts] strategy = "lww"`, on the `updated_at` version column
or on commit timestamps; counters merged as deltas). `Scenario.writers` writers per office, for
`Scenario.seconds`, insert, update and delete `Scenario.keys` grant rows and add to a few
budget counters, each write its own transaction, recorded once committed with its commit
timestamp (`pg_xact_commit_timestamp`: what the stream carries) and what it wrote. Meanwhile
(seeded schedule) one office's replicator is SIGKILLed and started again, and another office's
server is restarted (its writers pause around the restart so the record stays exact: a write
whose commit is in doubt would make the oracle guess). Then every key gets one last write at a
random office, `Scenario.final_gap` apart.

After quiescence (every replicator caught up with its source), `check` requires:

- the offices hold identical `grants` and `budgets`;
- every key holds the write with the greatest ordering key of the README's decision table
  (version column: an insert/update by its `updated_at`, a delete by the later of the version
  it deleted and its commit time; commit-time LWW: (commit time, office)), absent iff that
  write is a delete;
- independently of that oracle, every key whose last committed write stands `CLEAR` seconds
  clear of the one before it holds that write (deletes included);
- each budget's `spent` equals the sum of every committed increment at every office;
- nothing loops: the offices' tuple counters stay still for 5 s;
- conflicts were logged, each with a known kind and outcome and strategy "lww";
- every replicator is alive and none printed a traceback.

The seed (`CDC_SYNC_SEED` overrides the test's) decides the writers' choices and the fault
schedule; it is printed at the start and named in every failure. `CDC_SYNC_SOAK_SECONDS`
lengthens the write phase (faults then repeat every `FAULT_CYCLE` seconds): the soak mode.
"""

from __future__ import annotations

import os
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from cdc_sync import commands
from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.resolve import CONFLICT_KINDS, OUTCOMES, Version, delete_version, parse_version
from tests.integration.helpers import (
    CliProcess,
    connect,
    table_fingerprint,
    wait_streaming,
    wait_until_caught_up,
    write_config,
)

from .helpers import Office, office_config, tuple_counters

SEED_ENV = "CDC_SYNC_SEED"
SOAK_ENV = "CDC_SYNC_SOAK_SECONDS"
CLEAR = 0.05  # a last write this far (s) after the one before it must stand
FAULT_CYCLE = 30.0  # soak: one replicator kill and one server restart per cycle
MAX_WRITES = 3000  # per writer
STILL_SECONDS = 5.0
STATS_FLUSH_SECONDS = 11.0

CHECKER_DDL = (
    "CREATE TABLE grants (id int PRIMARY KEY, office text, amount numeric(12,2), note text, "
    "writer text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE budgets (id int PRIMARY KEY, spent numeric(14,2) NOT NULL DEFAULT 0)",
    "ALTER TABLE budgets REPLICA IDENTITY FULL",
)

INSERT = ("INSERT INTO grants (id, office, amount, note, writer, updated_at) "
          "VALUES (%(k)s, %(o)s, %(a)s, 'ins', %(w)s, clock_timestamp()) ON CONFLICT (id) DO NOTHING")
UPDATE = ("UPDATE grants SET office = %(o)s, amount = %(a)s, note = 'upd', writer = %(w)s, "
          "updated_at = clock_timestamp() WHERE id = %(k)s")
UPSERT = ("INSERT INTO grants (id, office, amount, note, writer, updated_at) "
          "VALUES (%(k)s, %(o)s, %(a)s, 'final', %(w)s, clock_timestamp()) ON CONFLICT (id) DO "
          "UPDATE SET office = excluded.office, amount = excluded.amount, note = excluded.note, "
          "writer = excluded.writer, updated_at = excluded.updated_at")
DELETE = "DELETE FROM grants WHERE id = %(k)s"
RETURNING = " RETURNING writer, amount::text, updated_at::text, pg_current_xact_id()::text"
INCREMENT = "UPDATE budgets SET spent = spent + %(d)s WHERE id = %(k)s RETURNING id"

# Per-column merge ("columns"): an update sets a random subset of these to values no write
# repeats (so every column it sets is a column it changed); inserts set every column.
MERGED = ("amount", "note", "writer")
GRANT_COLUMNS = ("office", "amount", "note", "writer", "updated_at")
COL_RETURNING = (" RETURNING office, amount::text, note, writer, updated_at::text, xmax = 0, "
                 "pg_current_xact_id()::text")
COL_INSERT = ("INSERT INTO grants (id, office, amount, note, writer, updated_at) VALUES "
              "(%(k)s, %(o)s, %(amount)s, %(note)s, %(writer)s, clock_timestamp()) "
              "ON CONFLICT (id) DO NOTHING")
COL_UPSERT = ("INSERT INTO grants (id, office, amount, note, writer, updated_at) VALUES "
              "(%(k)s, %(o)s, %(amount)s, %(note)s, %(writer)s, clock_timestamp()) "
              "ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, note = excluded.note, "
              "writer = excluded.writer")


def chosen_seed(default: int) -> int:
    """`CDC_SYNC_SEED` when set (an integer, or "random" for a fresh one), else `default`."""
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return default
    if raw == "random":
        return random.SystemRandom().randrange(1 << 31)
    return int(raw)


def soak_seconds(default: float) -> float:
    raw = os.environ.get(SOAK_ENV, "").strip()
    return float(raw) if raw else default


ORDERED_BY = {"version": "updated_at", "commit": "commit time",
              "columns": "commit time, column by column (merge_columns)"}


@dataclass(frozen=True)
class Scenario:
    # lww on updated_at, on commit timestamps, or column by column (merge_columns)
    strategy: Literal["version", "commit", "columns"]
    identity: Literal["default", "full"]  # REPLICA IDENTITY of grants at every office
    seed: int
    seconds: float = 12.0
    writers: int = 2  # per office
    keys: int = 40
    budgets: int = 5
    faults: bool = True
    final_gap: float = 0.06
    # A NATS JetStream URL: every office's `cdc-sync run` goes through the bus (`[bus]`: its
    # own stream, capture and appliers in that process), as `tests/bus/test_bus_mesh.py` runs.
    bus: str | None = None

    def conflicts(self) -> dict[str, Any]:
        tables: dict[str, Any] = {"public.budgets": {"counters": ["spent"]}}
        if self.strategy == "version":
            tables["public.grants"] = {"version_column": "updated_at"}
        elif self.strategy == "columns":
            tables["public.grants"] = {"merge_columns": True}
        return {"strategy": "lww", "tables": tables}

    def __str__(self) -> str:
        return (f"seed {self.seed} ({SEED_ENV}={self.seed} reruns it): "
                f"{'through NATS, ' if self.bus else ''}lww on "
                f"{ORDERED_BY[self.strategy]}, "
                f"REPLICA IDENTITY {self.identity.upper()}, {self.seconds:g} s, "
                f"{self.writers} writers per office, {self.keys} keys")


@dataclass(frozen=True)
class Write:
    office: str
    key: int
    op: str  # insert | update | upsert | delete
    commit_ts: datetime
    writer: str  # what the row says after the write (a delete: the deleted row's writer)
    amount: str
    version: str  # updated_at written (a delete: of the deleted row), as text
    cols: tuple[tuple[str, str | None], ...] = ()  # "columns": every column it set, as text

    def cols_dict(self) -> dict[str, str | None]:
        return dict(self.cols)


@dataclass
class Record:
    """What was committed, by every writer."""

    writes: list[Write] = field(default_factory=list)
    increments: Counter[int] = field(default_factory=Counter)  # budget -> sum of deltas
    counts: Counter[str] = field(default_factory=Counter)  # office -> committed writes
    rolled_back: Counter[str] = field(default_factory=Counter)  # office -> deadlocks
    faults: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, writes: Iterable[Write], increments: Counter[int], office: str, *,
            added: int = 0, rolled_back: int = 0) -> None:
        """`added`: how many increments `increments` sums up."""
        with self.lock:
            mine = list(writes)
            self.writes.extend(mine)
            self.increments.update(increments)
            self.counts[office] += len(mine) + added
            self.rolled_back[office] += rolled_back


class Gate:
    """Lets an office's writers be paused (between two writes) while its server restarts."""

    def __init__(self, writers: int) -> None:
        self.writers = writers
        self.cond = threading.Condition()
        self.closed = False
        self.waiting = 0
        self.generation = 0  # bumped at each reopening: writers reconnect

    def passage(self) -> int:
        """Wait while closed; the generation to connect under."""
        with self.cond:
            if self.closed:
                self.waiting += 1
                self.cond.notify_all()
                while self.closed:
                    self.cond.wait()
                self.waiting -= 1
            return self.generation

    def leave(self) -> None:
        """A writer that is done counts as waiting for good."""
        with self.cond:
            self.writers -= 1
            self.cond.notify_all()

    @contextmanager
    def closed_for(self, what: str) -> Iterator[None]:
        with self.cond:
            self.closed = True
            if not self.cond.wait_for(lambda: self.waiting >= self.writers, 60):
                raise AssertionError(f"writers did not pause for {what}")
        try:
            yield
        finally:
            with self.cond:
                self.closed = False
                self.generation += 1
                self.cond.notify_all()


class Replicators:
    """One `cdc-sync run` subprocess per office (its own source, the others as sites)."""

    def __init__(self, offices: Sequence[Office], conflicts: dict[str, Any], tmp: Path,
                 bus: str | None = None) -> None:
        self.settings: dict[str, Settings] = {}
        self.procs: dict[str, CliProcess] = {}
        for o in offices:
            data = office_config(o, [p for p in offices if p is not o], conflicts=conflicts)
            if bus is not None:
                data["bus"] = {"kind": "nats", "url": bus}
            self.settings[o.name] = settings_from_dict(data)
            self.procs[o.name] = CliProcess(write_config(tmp / f"{o.name}.toml", data))

    def init(self) -> None:
        for s in self.settings.values():
            commands.init(s)

    def start(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            self.procs[name].start()
        for name in names or tuple(self.procs):
            wait_streaming(self.settings[name], 60)

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def caught_up(self, timeout: float = 180) -> None:
        for s in self.settings.values():
            wait_until_caught_up(s, timeout)

    def conflicts_at(self, office: str) -> list[dict[str, Any]]:
        source = next(n for n in self.settings if n != office)
        return commands.conflicts(self.settings[source], site=office, limit=1_000_000)

    def health(self) -> list[str]:
        """What is wrong with the processes: exited, or a traceback in their output."""
        bad = []
        for name, proc in self.procs.items():
            if not proc.alive():
                bad.append(f"{name}'s replicator exited: {proc.stderr()[-2000:]}")
            elif "Traceback" in proc.stderr():
                bad.append(f"{name}'s replicator printed a traceback: {proc.stderr()[-3000:]}")
        return bad

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()


def writer_loop(sc: Scenario, o: Office, index: int, gate: Gate, stop: threading.Event,
                record: Record, errors: list[BaseException]) -> None:
    rng = random.Random(f"{sc.seed}:{o.name}:{index}")
    writes: list[Write] = []
    increments: Counter[int] = Counter()
    added = rolled_back = 0
    conn: psycopg.Connection[Any] | None = None
    generation = -1
    try:
        for n in range(MAX_WRITES):
            if stop.is_set():
                break
            now = gate.passage()
            if conn is None or now != generation:
                if conn is not None:
                    conn.close()
                conn, generation = connect(o.dsn), now  # autocommit: a transaction a statement
            r = rng.random()
            k = rng.randint(1, sc.keys)
            try:
                if r < 0.2:
                    b = rng.randint(1, sc.budgets)
                    d = rng.randint(1, 500)
                    if conn.execute(INCREMENT, {"k": b, "d": d}).fetchone() is not None:
                        increments[b] += d
                        added += 1
                elif sc.strategy == "columns":
                    op = "insert" if r < 0.4 else "update" if r < 0.8 else "delete"
                    w = write_columns(conn, op, o.name, k, f"{o.name}.{index}#{n}", rng)
                    if w is not None:
                        writes.append(w)
                else:
                    op, stmt = (("insert", INSERT) if r < 0.4 else
                                ("update", UPDATE) if r < 0.8 else ("delete", DELETE))
                    w = write_row(conn, stmt, op, o.name, k, rng.randint(1, 99_999),
                                  f"{o.name}.{index}#{n}")
                    if w is not None:
                        writes.append(w)
            except psycopg.errors.DeadlockDetected:
                rolled_back += 1  # with an applier: rolled back, nothing committed
            time.sleep(rng.uniform(0, 0.008))
    except BaseException as exc:
        errors.append(exc)
    finally:
        gate.leave()
        if conn is not None:
            conn.close()
        record.add(writes, increments, o.name, added=added, rolled_back=rolled_back)


def write_row(conn: psycopg.Connection[Any], stmt: str, op: str, office: str, key: int,
              amount: int, writer: str) -> Write | None:
    """One grants write in its own (autocommit) transaction; the committed write or None."""
    row = conn.execute(stmt + RETURNING, {"k": key, "o": office, "a": amount, "w": writer}
                       ).fetchone()
    if row is None:
        return None
    ts = conn.execute("SELECT pg_xact_commit_timestamp(xid(%s::xid8))", (row[3],)).fetchone()
    assert ts is not None and ts[0] is not None, "track_commit_timestamp is off"
    return Write(office, key, op, ts[0], row[0], row[1], row[2])


def write_columns(conn: psycopg.Connection[Any], op: str, office: str, key: int, tag: str,
                  rng: random.Random) -> Write | None:
    """One grants write of the "columns" scenario in its own transaction: an insert of every
    column, an update of a random subset of `MERGED` (an upsert: all of them, or every column
    when it inserts), or a delete; the committed write (with the columns it set) or None."""
    unique = {"amount": str(zlib.crc32(tag.encode()) % 10**9), "note": f"n:{tag}", "writer": tag}
    params: dict[str, Any] = {"k": key, "o": office, **unique}
    if op == "delete":
        row = conn.execute(DELETE + COL_RETURNING, params).fetchone()
    elif op == "update":
        chosen = rng.sample(MERGED, rng.randint(1, len(MERGED)))
        stmt = sql.SQL("UPDATE grants SET {} WHERE id = %(k)s").format(sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c)) for c in chosen))
        row = conn.execute(stmt.as_string(None) + COL_RETURNING, params).fetchone()
    else:
        row = conn.execute((COL_INSERT if op == "insert" else COL_UPSERT) + COL_RETURNING,
                           params).fetchone()
    if row is None:
        return None
    ts = conn.execute("SELECT pg_xact_commit_timestamp(xid(%s::xid8))", (row[6],)).fetchone()
    assert ts is not None and ts[0] is not None, "track_commit_timestamp is off"
    values = dict(zip(GRANT_COLUMNS, row[:5], strict=True))
    if op == "delete":
        cols: tuple[tuple[str, str | None], ...] = ()
    elif op == "insert" or (op == "upsert" and row[5]):  # inserted (xmax = 0 on upsert)
        cols = tuple(values.items())
    else:
        cols = tuple((c, values[c]) for c in (chosen if op == "update" else MERGED))
    return Write(office, key, op, ts[0], str(row[3]), str(row[1]), str(row[4]), cols)


def fault_loop(sc: Scenario, offices: Sequence[Office], gates: dict[str, Gate],
               reps: Replicators, stop: threading.Event, record: Record,
               errors: list[BaseException]) -> None:
    """Per cycle: SIGKILL one office's replicator (started again 1-2 s later), then restart
    another office's server with its writers paused."""
    rng = random.Random(f"{sc.seed}:faults")
    cycle = min(FAULT_CYCLE, sc.seconds)
    began = time.monotonic()
    try:
        for c in range(max(1, int(sc.seconds // cycle))):
            base = began + c * cycle
            victim, restarted = rng.sample([o.name for o in offices], 2)
            if stop.wait(max(0.0, base + rng.uniform(0.2, 0.35) * cycle - time.monotonic())):
                return
            reps.kill(victim)
            record.faults.append(f"{time.monotonic() - began:.1f}s SIGKILL {victim}'s replicator")
            time.sleep(rng.uniform(1.0, 2.0))
            reps.procs[victim].start()
            if stop.wait(max(0.0, base + rng.uniform(0.55, 0.7) * cycle - time.monotonic())):
                return
            office = next(o for o in offices if o.name == restarted)
            with gates[restarted].closed_for(f"the restart of {restarted}"):
                record.faults.append(f"{time.monotonic() - began:.1f}s restart {restarted}")
                office.cluster.restart()
    except BaseException as exc:
        errors.append(exc)


def final_writes(sc: Scenario, offices: Sequence[Office], record: Record) -> None:
    """Every key, in a seeded order, gets one last write (upsert or delete) at a random office,
    `final_gap` seconds apart."""
    rng = random.Random(f"{sc.seed}:final")
    keys = list(range(1, sc.keys + 1))
    rng.shuffle(keys)
    conns = {o.name: connect(o.dsn) for o in offices}
    try:
        for k in keys:
            o = rng.choice(offices)
            op, stmt = ("delete", DELETE) if rng.random() < 0.3 else ("upsert", UPSERT)
            if sc.strategy == "columns":
                w = write_columns(conns[o.name], op, o.name, k, f"{o.name}.final{k}", rng)
            else:
                w = write_row(conns[o.name], stmt, op, o.name, k, rng.randint(1, 99_999),
                              f"{o.name}.final")
            if w is not None:
                record.add([w], Counter(), o.name)
            time.sleep(sc.final_gap)
    finally:
        for c in conns.values():
            c.close()


def run(sc: Scenario, offices: Sequence[Office], tmp: Path) -> None:
    """Run the scenario on `offices` (clusters with `CHECKER_DDL` run) and check the end state;
    AssertionError naming the seed when something does not hold."""
    print(f"convergence checker: {sc}")
    if sc.identity == "full":
        for o in offices:
            o.execute("ALTER TABLE grants REPLICA IDENTITY FULL")
    reps = Replicators(offices, sc.conflicts(), tmp, sc.bus)
    try:
        reps.init()
        reps.start()
        for b in range(1, sc.budgets + 1):
            offices[0].execute("INSERT INTO budgets (id) VALUES (%s)", (b,))
        reps.caught_up()
        record = Record()
        gates = {o.name: Gate(sc.writers) for o in offices}
        stop = threading.Event()
        errors: list[BaseException] = []
        threads = [threading.Thread(target=writer_loop, name=f"writer-{o.name}-{i}",
                                    args=(sc, o, i, gates[o.name], stop, record, errors))
                   for o in offices for i in range(sc.writers)]
        if sc.faults:
            threads.append(threading.Thread(target=fault_loop, name="faults",
                                            args=(sc, offices, gates, reps, stop, record,
                                                  errors)))
        for t in threads:
            t.start()
        stop.wait(sc.seconds)
        stop.set()
        for t in threads:
            t.join(120)
        assert not errors, f"[{sc}] a writer or the fault injector failed: {errors[0]!r}"
        for proc in reps.procs.values():
            if not proc.alive():
                proc.start()  # killed just before the end
        final_writes(sc, offices, record)
        reps.caught_up()
        check(sc, offices, reps, record)
    finally:
        reps.close()


# -- the verdict --------------------------------------------------------------------------------

def ordering_key(sc: Scenario, w: Write) -> tuple[Any, ...]:
    """The README's ordering key of a committed write under the scenario's strategy."""
    if sc.strategy in ("commit", "columns"):
        return (w.commit_ts, w.office)
    if w.op == "delete":
        deleted = w.version if sc.identity == "full" else None
        v: Version = delete_version(deleted, w.commit_ts)
        return (v, 1, w.office)
    return (parse_version(w.version), 0, w.office)


Held = tuple[str | None, ...] | None  # (writer, amount, updated_at) or absent; "columns":
# (office, amount, note, writer, updated_at)


def held(w: Write) -> Held:
    return None if w.op == "delete" else (w.writer, w.amount, w.version)


def expected(sc: Scenario, log: Sequence[Write]) -> dict[int, Held]:
    out: dict[int, Held] = {k: None for k in range(1, sc.keys + 1)}
    for k in out:
        writes = [w for w in log if w.key == k]
        if not writes:
            continue
        last = max(writes, key=lambda w: ordering_key(sc, w))
        if sc.strategy != "columns":
            out[k] = held(last)
        elif last.op != "delete":
            # The row stands (its latest write is not a delete); each column holds the value
            # of the latest write that set it (deletes keep cells: merge_columns' rules).
            out[k] = tuple(max((w for w in writes if c in dict(w.cols)),
                               key=lambda w: ordering_key(sc, w)).cols_dict()[c]
                           for c in GRANT_COLUMNS)
    return out


def clear_last(sc: Scenario, log: Sequence[Write]) -> dict[int, Write]:
    """Keys whose last committed write (by commit time) is `CLEAR` s after the one before."""
    out = {}
    for k in range(1, sc.keys + 1):
        writes = sorted((w for w in log if w.key == k), key=lambda w: w.commit_ts)
        if len(writes) == 1 or (len(writes) > 1 and (
                writes[-1].commit_ts - writes[-2].commit_ts).total_seconds() >= CLEAR):
            out[k] = writes[-1]
    return out


def grants_at(o: Office, keys: int, columns: bool = False) -> dict[int, Held]:
    what = ("office, amount::text, note, writer, updated_at::text" if columns
            else "writer, amount::text, updated_at::text")
    with connect(o.dsn) as conn:
        rows = conn.execute(f"SELECT id, {what} FROM grants").fetchall()  # noqa: S608
    got: dict[int, Held] = {k: None for k in range(1, keys + 1)}
    got.update({r[0]: tuple(r[1:]) for r in rows})
    return got


def holds(sc: Scenario, final: Held, w: Write) -> bool:
    """Whether the row `final` holds write `w` (a delete: absent; "columns": every column it
    set has its value)."""
    if w.op == "delete" or final is None:
        return (w.op == "delete") == (final is None)
    if sc.strategy != "columns":
        return final == held(w)
    now = dict(zip(GRANT_COLUMNS, final, strict=True))
    return all(now[c] == v for c, v in w.cols)


def history(log: Sequence[Write], keys: Iterable[int], last: int = 4) -> dict[int, list[str]]:
    out = {}
    for k in keys:
        writes = sorted((w for w in log if w.key == k), key=lambda w: w.commit_ts)[-last:]
        out[k] = [f"{w.commit_ts.time()} {w.office} {w.op} {w.writer} v={w.version}"
                  + (f" set {w.cols_dict()}" if w.cols else "") for w in writes]
    return out


def explain(sc: Scenario, offices: Sequence[Office], log: Sequence[Write]) -> str:
    """For the first keys the offices disagree on: each office's row, column clocks and
    tombstone, and the key's last writes."""
    finals = {o.name: grants_at(o, sc.keys, sc.strategy == "columns") for o in offices}
    keys = [k for k in range(1, sc.keys + 1)
            if len({repr(f[k]) for f in finals.values()}) > 1][:3]
    out = []
    for k in keys:
        out.append(f"\nkey {k}:")
        for o in offices:
            with connect(o.dsn) as conn:
                clocks = conn.execute("SELECT clocks::text FROM cdc_sync.column_versions "
                                      "WHERE key = jsonb_build_object('id', %s::text)",
                                      (str(k),)).fetchall()
                tomb = conn.execute("SELECT deleted_at, source, row_values::text FROM "
                                    "cdc_sync.tombstones WHERE key = jsonb_build_object("
                                    "'id', %s::text)", (str(k),)).fetchall()
                logged = conn.execute(
                    "SELECT source, kind, outcome, commit_ts::time::text, "
                    "incoming_row->>'writer', local_row->>'writer' FROM cdc_sync.conflicts "
                    "WHERE key = jsonb_build_object('id', %s::text) ORDER BY id DESC LIMIT 6",
                    (str(k),)).fetchall()
            out.append(f"  {o.name}: {finals[o.name][k]} clocks={clocks} tomb={tomb} "
                       f"conflicts (latest first)={logged}")
        out.extend(f"  {h}" for h in history(log, [k], last=6)[k])
    if not keys:
        out.append("\n(no key differs any more: the offices were still converging)")
    for o in offices:
        with connect(o.dsn) as conn:
            dead = conn.execute("SELECT count(*), min(error) FROM cdc_sync.dead_letters"
                                ).fetchone()
        if dead and dead[0]:
            out.append(f"\n{o.name}: {dead[0]} dead letters, e.g. {dead[1]}")
    return "\n".join(out)


def check(sc: Scenario, offices: Sequence[Office], reps: Replicators, record: Record) -> None:
    log = record.writes
    where = f"[{sc}; faults: {record.faults}]"
    assert all(record.counts[o.name] > 100 for o in offices), f"{where} few writes: {record.counts}"
    if sc.faults:
        assert len(record.faults) >= 2, f"{where} the faults were not injected"
    for table in ("grants", "budgets"):
        views = {o.name: table_fingerprint(o.dsn, f"public.{table}") for o in offices}
        if len({tuple(v) for v in views.values()}) > 1:
            first = set(views[offices[0].name])
            diff = {n: sorted(set(v) ^ first)[:8] for n, v in views.items()}
            raise AssertionError(f"{where} offices differ on {table}: {diff}"
                                 + (explain(sc, offices, log) if table == "grants" else ""))
    final = grants_at(offices[0], sc.keys, sc.strategy == "columns")
    assert any(v is not None for v in final.values()), f"{where} no row left: proves little"
    want = expected(sc, log)
    wrong = {k: (v, want[k]) for k, v in final.items() if v != want[k]}
    assert not wrong, (f"{where} keys not holding the write with the greatest ordering key "
                       f"(got, expected): {wrong}; their last writes: {history(log, wrong)}")
    clear = clear_last(sc, log)
    assert len(clear) >= sc.keys // 2, f"{where} only {len(clear)} keys with a clear last write"
    stale = {k: (final[k], held(w)) for k, w in clear.items() if not holds(sc, final[k], w)}
    assert not stale, (f"{where} keys not holding a last write that stands clear (got, "
                       f"written): {stale}; their last writes: {history(log, stale)}")
    with connect(offices[0].dsn) as conn:
        spent = {r[0]: int(r[1]) for r in conn.execute("SELECT id, spent FROM budgets")}
    sums = {b: record.increments[b] for b in range(1, sc.budgets + 1)}
    assert spent == sums, f"{where} budgets (got) != the sum of every increment: {spent} {sums}"
    time.sleep(STATS_FLUSH_SECONDS)  # see tests/multi/test_convergence.py: pgstat idle flush
    before = {o.name: tuple_counters(o.dsn, ["grants", "budgets"]) for o in offices}
    time.sleep(STILL_SECONDS)
    after = {o.name: tuple_counters(o.dsn, ["grants", "budgets"]) for o in offices}
    assert before == after, f"{where} rows keep changing after convergence: {before} {after}"
    logged = [c for o in offices for c in reps.conflicts_at(o.name)]
    assert logged, f"{where} no conflict was logged"
    for c in logged:
        assert c["kind"] in CONFLICT_KINDS and c["outcome"] in OUTCOMES, (where, c)
        assert c["strategy"] == "lww", (where, c)
    bad = reps.health()
    assert not bad, f"{where} {bad[0]}"
    print(f"converged: {dict(record.counts)} writes, {dict(record.rolled_back)} rolled back by "
          f"deadlocks with an applier, {sum(v is not None for v in final.values())} rows left, "
          f"{len(clear)} clear last writes held, budgets {spent}, faults {record.faults}, "
          f"{len(logged)} conflicts: "
          f"{sorted(Counter((c['kind'], c['outcome']) for c in logged).items())}")

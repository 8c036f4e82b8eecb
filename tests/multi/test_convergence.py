"""Three offices, each on its own cluster, each replicating to the two others with LWW, while
writers at all three hammer the same ten keys with inserts, updates and deletes.

Every committed write is recorded with its commit timestamp (`pg_xact_commit_timestamp` of its
own transaction: exactly the time the source stream carries) and what it wrote. Afterwards:

- the three offices hold identical rows;
- each key holds its last write: with commit-timestamp LWW the write with the greatest
  (commit time, office) — a delete means the row is absent; with `version_column =
  "updated_at"` the write with the greatest ordering key: an insert/update by its
  `updated_at`, a delete by the later of the version it deleted (REPLICA IDENTITY FULL) and
  its commit time; absent iff that write is a delete;
- nothing loops: once converged, the offices' tuple counters stay still for 5 s;
- conflicts were logged, with kind, strategy and outcome.

A writer's statement may fail with a deadlock against an applier (a local DELETE takes the
row lock, then the tombstone trigger's lock; an applier can take them the other way round
within one transaction): like any client, the writer goes on, and nothing was committed
(the count is printed).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from cdc_sync.embedded import ServerBinaries
from cdc_sync.resolve import CONFLICT_KINDS, OUTCOMES, Version, delete_version, parse_version
from tests.integration.helpers import connect

from .helpers import Mesh, Office, mesh, tuple_counters

OFFICES = ("berlin", "tokyo", "washington")
KEYS = 10
SECONDS = 10.0
MAX_WRITES = 1500  # per office
STILL_SECONDS = 5.0
STATS_FLUSH_SECONDS = 11.0

MakeOffices = Callable[..., list[Office]]


@dataclass(frozen=True)
class Write:
    office: str
    key: int
    op: str  # insert | update | delete
    commit_ts: datetime
    writer: str  # what the row says after the write (for a delete: the deleted row's writer)
    amount: str
    version: str  # updated_at written (for a delete: of the deleted row), UTC text


INSERT = ("INSERT INTO grants (id, office, amount, note, writer, updated_at) "
          "VALUES (%(k)s, %(o)s, %(a)s, 'ins', %(w)s, clock_timestamp()) ON CONFLICT (id) DO NOTHING")
UPDATE = ("UPDATE grants SET office = %(o)s, amount = %(a)s, note = 'upd', writer = %(w)s, "
          "updated_at = clock_timestamp() WHERE id = %(k)s")
DELETE = "DELETE FROM grants WHERE id = %(k)s"
RETURNING = " RETURNING writer, amount::text, updated_at::text, pg_current_xact_id()::text"


def run_writers(made: list[Office], seconds: float = SECONDS) -> list[Write]:
    """One writer per office for `seconds` (at most MAX_WRITES each); every committed write."""
    log: list[Write] = []
    errors: list[BaseException] = []
    deadlocks: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(made))

    def writer(o: Office) -> None:
        rng = random.Random(f"{o.name}-{time.time_ns()}")
        mine: list[Write] = []
        try:
            with connect(o.dsn) as conn:  # autocommit: each statement its own transaction
                start.wait(30)
                stop_at = time.monotonic() + seconds
                for n in range(MAX_WRITES):
                    if time.monotonic() >= stop_at:
                        break
                    k = rng.randint(1, KEYS)
                    r = rng.random()
                    op, stmt = ("insert", INSERT) if r < 0.3 else (
                        ("update", UPDATE) if r < 0.8 else ("delete", DELETE))
                    params = {"k": k, "o": o.name, "a": rng.randint(1, 99_999),
                              "w": f"{o.name}#{n}"}
                    try:
                        row = conn.execute(stmt + RETURNING, params).fetchone()
                    except psycopg.errors.DeadlockDetected:
                        # With the applier (see the module docstring): rolled back, go on.
                        deadlocks.append(o.name)
                        continue
                    if row is not None:
                        ts = conn.execute("SELECT pg_xact_commit_timestamp(xid(%s::xid8))",
                                          (row[3],)).fetchone()
                        assert ts is not None and ts[0] is not None
                        mine.append(Write(o.name, k, op, ts[0], row[0], row[1], row[2]))
                    time.sleep(rng.uniform(0, 0.01))
        except BaseException as exc:
            errors.append(exc)
        with lock:
            log.extend(mine)

    threads = [threading.Thread(target=writer, args=(o,), name=f"writer-{o.name}") for o in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    assert not errors, f"a writer failed: {errors[0]!r}"
    if deadlocks:
        print(f"writes rolled back by deadlocks with the applier: {Counter(deadlocks)}")
    return log


def expected_by_commit_time(log: list[Write]) -> dict[int, tuple[str, str, str] | None]:
    """key -> (writer, amount, updated_at) of the latest write by (commit time, office), or
    None when that write is a delete."""
    out: dict[int, tuple[str, str, str] | None] = {}
    for k in range(1, KEYS + 1):
        writes = [w for w in log if w.key == k]
        if not writes:
            continue
        last = max(writes, key=lambda w: (w.commit_ts, w.office))
        out[k] = None if last.op == "delete" else (last.writer, last.amount, last.version)
    return out


def expected_by_version(log: list[Write]) -> dict[int, tuple[str, str, str] | None]:
    """key -> the write with the greatest ordering key (README): an insert/update by its
    updated_at, a delete by the later of the version it deleted and its commit time (deletes
    after writes of one version, then the origin name); None when that write is a delete."""
    out: dict[int, tuple[str, str, str] | None] = {}
    for k in range(1, KEYS + 1):
        writes = [w for w in log if w.key == k]
        if not writes:
            continue

        def order(w: Write) -> tuple[Version, int, str]:
            if w.op == "delete":
                return delete_version(w.version, w.commit_ts), 1, w.office
            return parse_version(w.version), 0, w.office

        best = max(writes, key=order)
        out[k] = None if best.op == "delete" else (best.writer, best.amount, best.version)
    return out


def history(log: list[Write], keys: Iterable[int], last: int = 4) -> dict[int, list[str]]:
    """The last writes (by commit time) of `keys`, for failure messages."""
    out = {}
    for k in keys:
        writes = sorted((w for w in log if w.key == k), key=lambda w: w.commit_ts)[-last:]
        out[k] = [f"{w.commit_ts.time()} {w.op} {w.writer} v={w.version}" for w in writes]
    return out


def conflicts_of(m: Mesh, keys: Iterable[int], last: int = 3) -> dict[str, list[str]]:
    """The last conflicts logged for `keys` at each office, for failure messages."""
    wanted = {str(k) for k in keys}
    out = {}
    for o in m.offices:
        found = [c for c in m.conflicts_at(o.name) if str(c["key"].get("id")) in wanted]
        out[o.name] = [
            f"{c['key']['id']} {c['kind']} {c['outcome']} from {c['source']} "
            f"{(c['incoming_row'] or {}).get('writer')} @{c['commit_ts']} vs local "
            f"{(c['local_row'] or {}).get('writer')}" for c in found[:last]]
    return out


def actual(o: Office) -> dict[int, tuple[str, str, str] | None]:
    with connect(o.dsn) as conn:
        rows = conn.execute("SELECT id, writer, amount::text, updated_at::text FROM grants"
                            ).fetchall()
    got: dict[int, tuple[str, str, str] | None] = {k: None for k in range(1, KEYS + 1)}
    got.update({r[0]: (r[1], r[2], r[3]) for r in rows})
    return got


def assert_still(m: Mesh) -> None:
    """No change loops between the offices: their tuple counters do not move for 5 s.

    First 11 s of quiet: a backend that flushed its statistics less than a second before its
    last transaction keeps the rest pending until its idle timeout (PGSTAT_IDLE_INTERVAL,
    10 s), so an applier's last writes may reach pg_stat_user_tables that late."""
    time.sleep(STATS_FLUSH_SECONDS)
    before = {o.name: tuple_counters(o.dsn, ["grants"]) for o in m.offices}
    time.sleep(STILL_SECONDS)
    after = {o.name: tuple_counters(o.dsn, ["grants"]) for o in m.offices}
    assert before == after, f"rows keep changing after convergence: {before} -> {after}"


def check_run(made: list[Office], conflicts: dict[str, Any],
              expected: Callable[[list[Write]], dict[int, Any]]) -> None:
    with mesh(made, conflicts=conflicts) as m:
        log = run_writers(made)
        counts = {o: sum(1 for w in log if w.office == o) for o in OFFICES}
        assert all(n > 100 for n in counts.values()), counts
        m.caught_up()  # every write has been applied everywhere: the state is final
        views = {o.name: actual(o) for o in made}
        keys = range(1, KEYS + 1)
        diverged = [k for k in keys if len({repr(v[k]) for v in views.values()}) > 1]
        differ = {k: {o: v[k] for o, v in views.items()} for k in diverged}
        assert not diverged, (f"offices differ on keys {differ}; last writes: "
                              f"{history(log, diverged, 3)}; their conflicts: "
                              f"{conflicts_of(m, diverged)}")
        final = views[made[0].name]
        assert any(v is not None for v in final.values()), "no row left: the run proves little"
        want = {k: None for k in keys} | expected(log)
        wrong = {k: (v, want[k]) for k, v in final.items() if v != want[k]}
        assert not wrong, (f"keys not holding their last write (got, expected): {wrong}; "
                           f"their last writes: {history(log, wrong)}")
        assert_still(m)
        logged = m.all_conflicts()
        print(f"writes {counts}, {sum(v is not None for v in final.values())} rows left, "
              f"{len(logged)} conflicts logged: "
              f"{sorted(Counter((c['kind'], c['outcome']) for c in logged).items())}")
        assert logged, "no conflict was logged"
        for c in logged:
            assert c["kind"] in CONFLICT_KINDS and c["outcome"] in OUTCOMES, c
            assert c["strategy"] == "lww", c


def test_lww_commit_timestamps(offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """[conflicts] strategy = "lww", no version column: source commit timestamps decide."""
    check_run(offices(OFFICES), {"strategy": "lww"}, expected_by_commit_time)


def test_lww_version_column(offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """[conflicts] strategy = "lww", version_column = "updated_at"."""
    made = offices(OFFICES)
    for o in made:
        o.execute("ALTER TABLE grants REPLICA IDENTITY FULL")
    check_run(made, {"strategy": "lww", "version_column": "updated_at"}, expected_by_version)

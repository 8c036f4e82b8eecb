"""Writes racing the applier, made deterministic (the interleavings the concurrent tests of
test_convergence.py / test_counters.py hit by chance).

Local writes (`_race`): berlin and washington replicate both ways. Paused, berlin commits a
write of a row; washington starts a write of the same row and keeps its transaction open. On
resuming, washington's applier of berlin's change blocks on washington's row lock; then
washington commits: its write is the later one (commit time) and must win at both offices, and
a counter increment must be added, not lost. (Regression tests of the applier's FOR UPDATE read
and its re-decision of rows inserted concurrently.)

Two appliers at one site: the last test holds one applier's transaction open at its commit
(a lock on its `cdc_sync.progress` row) while the other decides the same key.
"""

from __future__ import annotations

from collections.abc import Callable

from cdc_sync.embedded import ServerBinaries
from tests.integration.helpers import connect, wait_for

from .helpers import BUDGETS_DDL, COUNTERS, Mesh, Office, mesh, spent

A, B, C = "berlin", "washington", "tokyo"

MakeOffices = Callable[..., list[Office]]


def _applier_waits_on_lock(site: Office, source: str) -> Callable[[], bool]:
    def waiting() -> bool:
        return bool(site.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'", (f"cdc_sync:{source}",)))
    return waiting


def _race(m: Mesh, local_statement: str, remote_statement: str) -> None:
    """Paused: A commits `remote_statement`; B runs `local_statement` without committing.
    Resumed: once B's applier of A's change waits for B's row lock, B commits (later)."""
    with m.paused():
        m.office(A).execute(remote_statement)
        local = connect(m.office(B).dsn, autocommit=False)
        local.execute(local_statement)
    try:
        wait_for(_applier_waits_on_lock(m.office(B), A), 20,
                 "B's applier to wait for the row B is writing")
        local.commit()
    finally:
        local.close()
    m.caught_up()


def test_local_increment_committed_during_apply_is_kept(offices: MakeOffices,
                                                        server_binaries: ServerBinaries) -> None:
    made = offices([A, B], BUDGETS_DDL)
    with mesh(made, conflicts=COUNTERS) as m:
        m.office(A).execute("INSERT INTO budgets (id, office) VALUES (1, 'seed')")
        m.wait_same("budgets")
        _race(m, "UPDATE budgets SET spent = spent + 5 WHERE id = 1",
              "UPDATE budgets SET spent = spent + 5 WHERE id = 1")
        assert spent(m.office(A)) == {1: "10.00"}
        assert spent(m.office(B)) == {1: "10.00"}, "B lost its own increment"


def test_local_write_committed_during_apply_wins(offices: MakeOffices,
                                                 server_binaries: ServerBinaries) -> None:
    made = offices([A, B], BUDGETS_DDL)
    with mesh(made, conflicts={"strategy": "lww"}) as m:
        m.office(A).execute("INSERT INTO grants (id, writer) VALUES (1, 'seed')")
        m.wait_same()
        _race(m, "UPDATE grants SET writer = 'washington' WHERE id = 1",
              "UPDATE grants SET writer = 'berlin' WHERE id = 1")
        writers = {o.name: o.scalar("SELECT writer FROM grants WHERE id = 1") for o in made}
        assert writers == {A: B, B: B}, "the later local write was overwritten at B"


def test_local_insert_committed_during_apply_wins(offices: MakeOffices,
                                                  server_binaries: ServerBinaries) -> None:
    made = offices([A, B], BUDGETS_DDL)
    with mesh(made, conflicts={"strategy": "lww"}) as m:
        _race(m, "INSERT INTO grants (id, writer) VALUES (7, 'washington')",
              "INSERT INTO grants (id, writer) VALUES (7, 'berlin')")
        writers = {o.name: o.scalar("SELECT writer FROM grants WHERE id = 7") for o in made}
        assert writers == {A: B, B: B}, "the later local insert was overwritten at B"


def test_delete_and_older_update_of_a_missing_row_from_two_offices(
        offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """tokyo: the site. It has lost row 9 (no tombstone). berlin updates row 9, washington
    deletes it later. tokyo applies washington's delete first (a delete of a missing row:
    tombstone) but its transaction is held open at commit; meanwhile berlin's older update
    arrives. Once both commit, row 9 must be gone at tokyo as everywhere else."""
    made = offices([A, B, C])
    with mesh(made, conflicts={"strategy": "lww"}) as m:
        m.office(A).execute("INSERT INTO grants (id, writer) VALUES (9, 'seed')")
        m.wait_same()
        site = m.office(C)
        m.stop()
        site.silently("DELETE FROM grants WHERE id = 9")
        m.office(A).execute("UPDATE grants SET writer = 'berlin' WHERE id = 9")
        m.office(B).execute("DELETE FROM grants WHERE id = 9")
        with connect(site.dsn, autocommit=False) as hold:
            # washington's applier at tokyo will wait at commit, on its progress row.
            hold.execute("SELECT * FROM cdc_sync.progress WHERE source = %s FOR UPDATE", (B,))
            m.start(B)
            wait_for(_applier_waits_on_lock(site, B), 20,
                     "washington's applier at tokyo to wait at its commit")
            m.start(A)
            # berlin's applier must now wait for washington's decision on the same key (an
            # advisory lock per key), not decide on its own against a tombstone it cannot see.
            wait_for(_applier_waits_on_lock(site, A), 20,
                     "berlin's applier at tokyo to wait for washington's on key 9")
            hold.rollback()
        m.caught_up(A)
        m.start(C)
        m.caught_up()
        assert site.scalar("SELECT count(*) FROM cdc_sync.tombstones") == 1
        present = {o.name: o.scalar("SELECT count(*) FROM grants WHERE id = 9") for o in made}
        assert present == {A: 0, B: 0, C: 0}, "berlin's older update survived at tokyo"


def test_a_deadlock_with_a_local_writer_retries_only_the_target_transaction(
        offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """washington's applier of berlin's transaction (keys 1 and 2) locks row 1 and waits for
    row 2, which a local transaction at washington holds; that transaction then wants row 1:
    a deadlock, which the server breaks by failing the applier (it waited first; the local
    session's deadlock_timeout is longer). The worker rolls back and applies that target
    transaction again: no replay of the stream, and the local writer's later writes stand."""
    made = offices([A, B])
    with mesh(made, conflicts={"strategy": "lww"}) as m:
        m.office(A).execute("INSERT INTO grants (id, writer) VALUES (1, 'seed'), (2, 'seed')")
        m.wait_same()
        with m.paused():
            m.office(A).execute("UPDATE grants SET writer = 'berlin' WHERE id IN (1, 2)")
            local = connect(m.office(B).dsn, autocommit=False)
            local.execute("SET deadlock_timeout = '20s'")
            local.execute("UPDATE grants SET writer = 'washington' WHERE id = 2")
        try:
            wait_for(_applier_waits_on_lock(m.office(B), A), 20,
                     "B's applier to wait for row 2")
            local.execute("UPDATE grants SET writer = 'washington' WHERE id = 1")
            local.commit()
        finally:
            local.close()
        m.caught_up()
        worker = next(w for w in m.runners[A].pipeline.workers if w.site == B)
        assert worker.lock_retries >= 1, "the applier was not the deadlock's victim"
        assert m.runners[A].pipeline.rewinds == 0, "the stream was replayed"
        writers = {o.name: sorted(r[0] for r in connect(o.dsn).execute(
            "SELECT writer FROM grants ORDER BY id").fetchall()) for o in made}
        assert writers == {A: [B, B], B: [B, B]}

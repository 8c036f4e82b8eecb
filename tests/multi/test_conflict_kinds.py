"""Each conflict kind end to end between two offices, with a deterministic order.

Both directions replicate (berlin <-> washington). For each scenario the replicators are
paused, berlin writes first (the older commit), washington second (the newer one), then the
replicators resume. After convergence both offices must hold the same rows, the row the
strategy picks, and each office's `cdc_sync.conflicts` (through `commands.conflicts`) must
say what happened there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cdc_sync.embedded import ServerBinaries
from cdc_sync.errors import SourceError
from cdc_sync.resolve import OUTCOMES
from tests.integration.helpers import connect

from .helpers import Mesh, Office, conflict_kinds, mesh, tombstone_keys

A, B = "berlin", "washington"  # A writes first (older commit), B second (newer commit)

MakeOffices = Callable[..., list[Office]]


def two_offices(offices: MakeOffices, *, full: bool = False) -> list[Office]:
    made = offices([A, B])
    if full:
        for o in made:
            o.execute("ALTER TABLE grants REPLICA IDENTITY FULL")
    return made


def seed(m: Mesh, *ids: int, amount: int = 100) -> None:
    """Rows `ids` written at A and replicated to B."""
    for i in ids:
        m.office(A).execute(
            "INSERT INTO grants (id, office, amount, note, writer) VALUES (%s, %s, %s, 'seed', "
            "'seed')", (i, A, amount))
    m.wait_same()


def update(o: Office, i: int, amount: int) -> None:
    o.execute("UPDATE grants SET amount = %s, office = %s, writer = %s, "
              "updated_at = clock_timestamp() WHERE id = %s", (amount, o.name, o.name, i))


def insert(o: Office, i: int, amount: int) -> None:
    o.execute("INSERT INTO grants (id, office, amount, note, writer) VALUES (%s, %s, %s, %s, %s)",
              (i, o.name, amount, f"from {o.name}", o.name))


def delete(o: Office, i: int) -> None:
    o.execute("DELETE FROM grants WHERE id = %s", (i,))


def row(m: Mesh, i: int) -> dict[str, Any] | None:
    """Row `i` as the (identical) offices hold it, after waiting for them to agree."""
    m.wait_same()
    found = m.office(A).scalar(
        "SELECT to_jsonb(g) - 'updated_at' FROM grants g WHERE id = %s", (i,))
    return found  # type: ignore[no-any-return]


def kinds_at(m: Mesh, office: str) -> set[tuple[str, str, str]]:
    return conflict_kinds(m.conflicts_at(office))


# -- update / update ----------------------------------------------------------------------

@pytest.mark.parametrize(("strategy", "full", "winner", "at_a", "at_b"), [
    pytest.param("lww", False, B, set(), {("update_update", "lww", "local_wins")},
                 id="lww"),
    pytest.param("lww", True, B, {("update_update", "lww", "incoming_wins")},
                 {("update_update", "lww", "local_wins")}, id="lww-full"),
    pytest.param("first_write_wins", True, A,
                 {("update_update", "first_write_wins", "local_wins")},
                 {("update_update", "first_write_wins", "incoming_wins")}, id="fww-full"),
])
def test_update_update(offices: MakeOffices, server_binaries: ServerBinaries, strategy: str,
                       full: bool, winner: str, at_a: set[Any], at_b: set[Any]) -> None:
    """Both offices update the same row while paused: lww keeps the newer update (B's),
    first_write_wins the older one (A's), at both offices."""
    with mesh(two_offices(offices, full=full), conflicts={"strategy": strategy}) as m:
        seed(m, 1)
        with m.paused():
            update(m.office(A), 1, 111)
            update(m.office(B), 1, 222)
        got = row(m, 1)
        assert got is not None
        assert (got["writer"], got["amount"]) == (winner, 111 if winner == A else 222)
        assert kinds_at(m, A) == at_a
        assert kinds_at(m, B) == at_b


def test_first_write_wins_needs_replica_identity_full(
        offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """Without the old row, first_write_wins cannot tell a concurrent update from a later one
    (the offices would diverge): init refuses the table and names the fix."""
    with pytest.raises(SourceError, match=r"REPLICA IDENTITY FULL"):
        with mesh(two_offices(offices),
                  conflicts={"strategy": "first_write_wins"}):
            pass


# -- insert / insert ----------------------------------------------------------------------

@pytest.mark.parametrize(("strategy", "winner", "at_a", "at_b"), [
    pytest.param("lww", B, {("insert_insert", "lww", "incoming_wins")},
                 {("insert_insert", "lww", "local_wins")}, id="lww"),
    pytest.param("first_write_wins", A, {("insert_insert", "first_write_wins", "local_wins")},
                 {("insert_insert", "first_write_wins", "incoming_wins")}, id="fww"),
])
def test_insert_insert(offices: MakeOffices, server_binaries: ServerBinaries, strategy: str,
                       winner: str, at_a: set[Any], at_b: set[Any]) -> None:
    """The same new key inserted at both offices while paused."""
    with mesh(two_offices(offices, full=strategy != "lww"), conflicts={"strategy": strategy}) as m:
        with m.paused():
            insert(m.office(A), 5, 555)
            insert(m.office(B), 5, 777)
        got = row(m, 5)
        assert got is not None
        assert (got["writer"], got["note"]) == (winner, f"from {winner}")
        assert kinds_at(m, A) == at_a
        assert kinds_at(m, B) == at_b


# -- updates and deletes ------------------------------------------------------------------

def test_delete_update_newer_update_wins(offices: MakeOffices,
                                         server_binaries: ServerBinaries) -> None:
    """A deletes, B updates later: the newer update wins at both offices (at A it is newer
    than the tombstone A's own delete left, and the whole row was sent)."""
    with mesh(two_offices(offices), conflicts={"strategy": "lww"}) as m:
        seed(m, 1)
        with m.paused():
            delete(m.office(A), 1)
            update(m.office(B), 1, 222)
        got = row(m, 1)
        assert got is not None and (got["writer"], got["amount"]) == (B, 222)
        assert kinds_at(m, A) == {("update_delete", "lww", "incoming_wins")}
        assert kinds_at(m, B) == {("delete_update", "lww", "local_wins")}


def test_update_delete_newer_delete_wins_at_the_other_office(
        offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """A updates, B deletes later: at A the newer delete removes A's row and leaves a
    tombstone for the key in A's cdc_sync.tombstones (the stale-update half, at B, is
    `test_update_delete_stale_update_does_not_resurrect`)."""
    with mesh(two_offices(offices), conflicts={"strategy": "lww"}) as m:
        seed(m, 1)
        with m.paused():
            update(m.office(A), 1, 111)
            delete(m.office(B), 1)
        m.caught_up()
        assert m.office(A).scalar("SELECT count(*) FROM grants WHERE id = 1") == 0
        assert tombstone_keys(m.office(A)) == {"1": B}


def test_update_delete_stale_update_does_not_resurrect(
        offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """A updates, B deletes later: the row is gone at both offices; at B, A's stale update
    meets the tombstone B's local delete left and is not applied."""
    with mesh(two_offices(offices), conflicts={"strategy": "lww"}) as m:
        seed(m, 1, 2)
        with m.paused():
            update(m.office(A), 1, 111)
            delete(m.office(B), 1)
        m.caught_up()
        assert m.office(B).scalar("SELECT count(*) FROM grants WHERE id = 1") == 0, \
            "A's stale update resurrected the row B deleted"
        assert row(m, 1) is None
        assert tombstone_keys(m.office(B)) == {"1": None}  # B's own delete
        assert kinds_at(m, B) == {("update_delete", "lww", "kept_deleted")}
        assert kinds_at(m, A) == set()  # the newer delete of an older row: no conflict


def test_stale_insert_does_not_resurrect(offices: MakeOffices,
                                         server_binaries: ServerBinaries) -> None:
    """A inserts key 3; B inserts it later and deletes it later still: gone everywhere."""
    with mesh(two_offices(offices), conflicts={"strategy": "lww"}) as m:
        with m.paused():
            insert(m.office(A), 3, 300)
            insert(m.office(B), 3, 333)
            delete(m.office(B), 3)
        m.caught_up()
        assert m.office(B).scalar("SELECT count(*) FROM grants WHERE id = 3") == 0, \
            "A's stale insert resurrected the row B deleted"
        assert row(m, 3) is None
        assert kinds_at(m, B) == {("insert_deleted", "lww", "kept_deleted")}
        assert kinds_at(m, A) == {("insert_insert", "lww", "incoming_wins")}


def test_delete_committed_after_a_concurrent_update_wins(
        offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """B deletes row 1 in a transaction that commits after A's update of the row committed:
    the delete is the later write (commit time), so the row is gone at both offices."""
    with mesh(two_offices(offices), conflicts={"strategy": "lww"}) as m:
        seed(m, 1)
        with m.paused(), connect(m.office(B).dsn, autocommit=False) as deleting:
            deleting.execute("DELETE FROM grants WHERE id = 1")
            update(m.office(A), 1, 111)
            deleting.commit()
        m.caught_up()
        assert m.office(A).scalar("SELECT count(*) FROM grants WHERE id = 1") == 0
        assert m.office(B).scalar("SELECT count(*) FROM grants WHERE id = 1") == 0, \
            "A's update, older than B's delete, resurrected the row at B"


def test_newer_insert_beats_tombstone(offices: MakeOffices,
                                      server_binaries: ServerBinaries) -> None:
    """B deletes key 1; later A deletes it too and inserts it afresh: at B, A's delete leaves
    a tombstone and A's newer insert still wins over it; at A, B's older delete loses."""
    with mesh(two_offices(offices), conflicts={"strategy": "lww"}) as m:
        seed(m, 1)
        with m.paused():
            delete(m.office(B), 1)
            delete(m.office(A), 1)
            insert(m.office(A), 1, 999)
        got = row(m, 1)
        assert got is not None and (got["writer"], got["amount"]) == (A, 999)
        assert kinds_at(m, A) == {("delete_update", "lww", "local_wins")}
        assert kinds_at(m, B) == {("delete_missing", "lww", "deleted")}


def test_tombstones_stop_stale_writes_at_a_third_office(
        offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """tokyo first receives washington's deletes (tombstones), then berlin's older update and
    insert of the same keys: they stay deleted (`update_delete` / `insert_deleted`,
    `kept_deleted`)."""
    made = offices([A, B, "tokyo"])
    with mesh(made, conflicts={"strategy": "lww"}) as m:
        seed(m, 1)
        m.stop()
        update(m.office(A), 1, 111)
        insert(m.office(A), 3, 300)
        delete(m.office(B), 1)
        insert(m.office(B), 3, 333)
        delete(m.office(B), 3)
        m.start(B)  # washington's changes reach tokyo first
        m.caught_up(B)
        tokyo = m.office("tokyo")
        assert tokyo.rows() == []
        assert len(tombstone_keys(tokyo)) == 2
        m.start(A, "tokyo")
        m.caught_up()
        assert kinds_at(m, "tokyo") == {("update_delete", "lww", "kept_deleted"),
                                        ("insert_deleted", "lww", "kept_deleted")}
        assert m.wait_same() == []


# -- rows the site does not have ----------------------------------------------------------

@pytest.mark.parametrize("strategy", [
    "source_wins",
    "lww",
])
def test_update_of_missing_row(offices: MakeOffices, server_binaries: ServerBinaries,
                               strategy: str) -> None:
    """berlin -> washington only. washington never had rows 1 and 2 (removed without
    replication triggers, so no tombstones); berlin updates both: row 1 (every column sent) is
    inserted at washington, row 2 (its big `note` not sent: unchanged TOAST) cannot be and
    stays missing; both are logged as update_missing."""
    made = two_offices(offices)
    made[0].execute("ALTER TABLE grants ALTER COLUMN note SET STORAGE EXTERNAL")
    conflicts = None if strategy == "source_wins" else {"strategy": strategy}
    with mesh(made, conflicts=conflicts, links={A: [B]}) as m:
        big = "".join(f"{i:08x}" for i in range(1000))
        m.office(A).execute("INSERT INTO grants (id, office, amount, note, writer) VALUES "
                            "(1, 'berlin', 1, 'small', 'seed'), (2, 'berlin', 2, %s, 'seed')",
                            (big,))
        m.caught_up()
        assert len(m.office(B).rows()) == 2
        m.office(B).silently("DELETE FROM grants")
        update(m.office(A), 1, 11)
        update(m.office(A), 2, 22)
        m.caught_up()
        site = m.office(B)
        assert site.scalar("SELECT writer || ':' || amount FROM grants WHERE id = 1") \
            == "berlin:11.00"
        assert site.scalar("SELECT count(*) FROM grants WHERE id = 2") == 0
        logged = {str(c["key"]["id"]): (c["kind"], c["strategy"], c["outcome"])
                  for c in m.conflicts_at(B)}
        assert logged == {"1": ("update_missing", strategy, "incoming_wins"),
                          "2": ("update_missing", strategy, "local_wins")}
        assert all(o in OUTCOMES for _k, _s, o in logged.values())


# -- merge --------------------------------------------------------------------------------

def test_merge_function(offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    """strategy merge with tests.multi.merge_funcs:prefer_larger_amount: whichever update has
    the larger amount survives at both offices, whoever wrote last."""
    conf = {"strategy": "merge", "merge": "tests.multi.merge_funcs:prefer_larger_amount"}
    with mesh(two_offices(offices, full=True), conflicts=conf) as m:
        seed(m, 1, 2)
        with m.paused():
            update(m.office(A), 1, 300)
            update(m.office(A), 2, 50)
            update(m.office(B), 1, 200)
            update(m.office(B), 2, 70)
        one, two = row(m, 1), row(m, 2)
        assert one is not None and (one["writer"], one["amount"]) == (A, 300)
        assert two is not None and (two["writer"], two["amount"]) == (B, 70)
        for office in (A, B):
            assert kinds_at(m, office) == {("update_update", "merge", "merged")}
            assert len(m.conflicts_at(office)) == 2

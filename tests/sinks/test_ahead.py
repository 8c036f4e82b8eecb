"""Chunks sent ahead of their results (`SiteWriter._send_ahead`, `_ahead.AheadPipe`).

A big chunk on the fast path is sent before the previous chunk's results are read. These tests
apply chunks to a real site through `SiteWriter` with a low `ahead_min_changes`, and check that
the path is taken and that everything the synchronous path guarantees still holds when the
trouble shows up one chunk late: a rejected change becomes a dead letter and nothing else is
lost, an update that finds no row inserts it before a later chunk updates it again, a rollback
or a subtransaction rollback undoes chunks still in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from integration.helpers import connect, execute, scalar

from cdc_sync.changes import Change, Op, Table
from cdc_sync.protocol import Lsn, ReplicaIdentity
from cdc_sync.sessions import connect_site
from cdc_sync.sinks._ahead import AheadPipe, Outcome, dollar_params
from cdc_sync.sinks.schema import migrate_site
from cdc_sync.sinks.site import SiteWriter

ITEM = Table(16384, "public", "item", ("id", "qty"), (23, 23), (-1, -1), (0,),
             ReplicaIdentity.DEFAULT)
ROWS = 60  # rows in the site table
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_dollar_params() -> None:
    assert dollar_params('SELECT %s, "a%%b", %s') == b'SELECT $1, "a%b", $2'


@pytest.fixture
def site(make_db: Callable[..., str]) -> str:
    dsn = make_db("ahead")
    migrate_site(dsn)
    execute(dsn, "CREATE TABLE item (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))",
            "INSERT INTO item SELECT g, 0 FROM generate_series(1, 60) g")
    return dsn


@pytest.fixture
def writer(site: str) -> Iterator[SiteWriter]:
    w = SiteWriter(connect_site(site), "src")
    w.ahead_min_changes = 10
    yield w
    w.conn.close()


def updates(ids: range, qty: Callable[[int], int]) -> list[Change]:
    return [Change(Op.UPDATE, i, ITEM, (str(i), str(qty(i)))) for i in ids]


def qty(dsn: str) -> dict[int, int]:
    with connect(dsn) as conn:
        return dict(conn.execute("SELECT id, qty FROM item").fetchall())


def dead_ids(dsn: str) -> list[int]:
    return [int(k) for k in scalar(
        dsn, "SELECT coalesce(array_agg((key->>'id') ORDER BY id), '{}') FROM cdc_sync.dead_letters")]


def test_big_chunks_are_sent_ahead_and_all_applied(site: str, writer: SiteWriter) -> None:
    writer.begin()
    for start in range(1, ROWS + 1, 20):
        writer.apply(updates(range(start, start + 20), lambda i: i * 10))
    assert writer.sent_ahead == 3
    writer.commit(Lsn(0x100), NOW)
    assert qty(site) == {i: i * 10 for i in range(1, ROWS + 1)}
    assert scalar(site, "SELECT applied_lsn::text FROM cdc_sync.progress") == "0/100"


def test_small_chunks_are_applied_at_once(site: str, writer: SiteWriter) -> None:
    writer.begin()
    writer.apply(updates(range(1, 6), lambda i: 1))
    writer.commit(Lsn(0x100), NOW)
    assert writer.sent_ahead == 0
    assert qty(site)[5] == 1


def test_a_rejected_change_in_a_chunk_sent_ahead_is_a_dead_letter(
        site: str, writer: SiteWriter) -> None:
    writer.begin()
    writer.apply(updates(range(1, 21), lambda i: -1 if i == 7 else 5))
    writer.apply(updates(range(21, 41), lambda i: 6))  # sent before chunk 1's error is read
    writer.apply(updates(range(41, 61), lambda i: 7))
    writer.commit(Lsn(0x100), NOW)
    assert dead_ids(site) == [7]
    assert writer.dead_letters == 1
    expected = {i: 5 if i <= 20 else 6 if i <= 40 else 7 for i in range(1, ROWS + 1)}
    expected[7] = 0
    assert qty(site) == expected


def test_missing_rows_are_inserted_before_the_next_chunk_updates_them(
        site: str, writer: SiteWriter) -> None:
    execute(site, "DELETE FROM item WHERE id IN (5, 6)")
    writer.begin()
    writer.apply(updates(range(1, 21), lambda i: 100 + i))  # 5 and 6 missing: inserted
    writer.apply(updates(range(1, 21), lambda i: 200 + i))  # then updated again, in order
    writer.commit(Lsn(0x100), NOW)
    rows = qty(site)
    assert all(rows[i] == 200 + i for i in range(1, 21)), rows
    assert scalar(site, "SELECT count(*) FROM cdc_sync.conflicts WHERE kind = 'update_missing'") == 2


def test_missing_rows_then_a_rejected_change_in_the_later_chunk(
        site: str, writer: SiteWriter) -> None:
    execute(site, "DELETE FROM item WHERE id = 5")
    writer.begin()
    writer.apply(updates(range(1, 21), lambda i: 1))
    writer.apply(updates(range(21, 41), lambda i: -1 if i == 30 else 2))
    writer.commit(Lsn(0x100), NOW)
    rows = qty(site)
    assert rows[5] == 1 and rows[30] == 0
    assert all(rows[i] == 2 for i in range(21, 41) if i != 30)
    assert dead_ids(site) == [30]


def test_rollback_drops_chunks_in_flight(site: str, writer: SiteWriter) -> None:
    writer.begin()
    writer.apply(updates(range(1, 21), lambda i: 9))
    writer.apply(updates(range(21, 41), lambda i: 9))
    writer.rollback()
    assert set(qty(site).values()) == {0}
    writer.begin()
    writer.apply(updates(range(41, 61), lambda i: 3))
    writer.commit(Lsn(0x100), NOW)
    assert [q for q in qty(site).values() if q] == [3] * 20


def test_subtransaction_rollback_undoes_chunks_in_flight(site: str, writer: SiteWriter) -> None:
    writer.begin()
    writer.apply(updates(range(1, 21), lambda i: 1))
    writer.savepoint("cdc_sub_1")
    writer.apply(updates(range(21, 41), lambda i: 2))
    writer.apply(updates(range(41, 61), lambda i: 3))
    writer.rollback_to("cdc_sub_1")
    writer.apply(updates(range(41, 61), lambda i: 4))
    writer.commit(Lsn(0x100), NOW)
    rows = qty(site)
    assert [rows[i] for i in (1, 21, 41)] == [1, 0, 4]
    assert writer.sent_ahead == 4


def test_a_table_first_described_inside_a_later_pipelined_chunk(
        site: str, writer: SiteWriter) -> None:
    """A table met for the first time while psycopg's own pipeline is open (a TRUNCATE run),
    after chunks were sent ahead: describing it must not touch psycopg's pipeline."""
    other = Table(16385, "public", "other", ("id",), (23,), (-1,), (0,), ReplicaIdentity.DEFAULT)
    execute(site, "CREATE TABLE other (id int PRIMARY KEY)", "INSERT INTO other VALUES (1)")
    writer.begin()
    writer.apply(updates(range(1, 21), lambda i: 1))
    writer.apply(updates(range(21, 41), lambda i: 2))
    writer.apply([Change(Op.TRUNCATE, 0, truncated=(other,))])
    writer.commit(Lsn(0x100), NOW)
    assert scalar(site, "SELECT count(*) FROM other") == 0
    assert qty(site)[40] == 2


# -- one savepoint per SAVEPOINT_EVERY chunks ---------------------------------------------------

def _next_xid(dsn: str) -> int:
    return int(scalar(dsn, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))


def _chunks(n: int, bad: dict[int, int] | None = None) -> list[list[Change]]:
    """`n` chunks of 20 updates, chunk k to rows 20k-19..20k (a lost chunk shows), setting qty
    k (or -1, which the CHECK rejects, for the row `bad[k]`)."""
    bad = bad or {}
    return [updates(range(20 * k - 19, 20 * k + 1), lambda i, k=k: -1 if bad.get(k) == i else k)
            for k in range(1, n + 1)]


@pytest.fixture
def rows240(site: str) -> str:
    execute(site, "INSERT INTO item SELECT g, 0 FROM generate_series(61, 240) g")
    return site


def _expected(n: int) -> dict[int, int]:
    return {i: (i + 19) // 20 if i <= 20 * n else 0 for i in range(1, 241)}


def _apply_in_one_transaction(writer: SiteWriter, chunks: list[list[Change]]) -> None:
    writer.begin()
    for chunk in chunks:
        writer.apply(chunk)
    writer.commit(Lsn(0x100), NOW)


def test_chunks_sent_ahead_share_savepoints(rows240: str, writer: SiteWriter) -> None:
    """12 batches, one savepoint per SAVEPOINT_EVERY (8): 2 subtransactions on the site,
    not 12 (each savepoint that writes takes a transaction id of its own)."""
    site = rows240
    before = _next_xid(site)
    _apply_in_one_transaction(writer, _chunks(12))
    assert (writer.sent_ahead, writer.ahead_savepoints) == (12, 2)
    assert _next_xid(site) - before == 1 + 2  # the transaction and its 2 subtransactions
    assert qty(site) == _expected(12)


@pytest.mark.parametrize("bad_chunk", [2, 7, 8, 9, 12])
def test_a_rejected_change_far_from_the_savepoint(rows240: str, writer: SiteWriter,
                                                  bad_chunk: int) -> None:
    """The error rolls back every batch since the savepoint in force (up to 7 earlier ones,
    settled long ago): they are applied again, the bad change alone is a dead letter."""
    site = rows240
    bad_row = 20 * bad_chunk - 15
    _apply_in_one_transaction(writer, _chunks(12, {bad_chunk: bad_row}))
    assert dead_ids(site) == [bad_row]
    assert writer.dead_letters == 1
    assert qty(site) == {**_expected(12), bad_row: 0}


@pytest.mark.parametrize("missing_chunk", [6, 8, 9])
def test_missing_rows_far_from_the_savepoint(rows240: str, writer: SiteWriter,
                                             missing_chunk: int) -> None:
    """A row chunk `missing_chunk` updates is gone from the site. Whether the savepoint in
    force is before that chunk (6, 8) or after it (8: chunk 9 set a new one while 8's results
    were unread), it is inserted once and logged as one conflict, and no chunk is lost."""
    site = rows240
    row = 20 * missing_chunk - 15
    execute(site, "DELETE FROM item WHERE id = %s", params=(row,))
    _apply_in_one_transaction(writer, _chunks(12))
    assert qty(site) == _expected(12)
    assert scalar(site, "SELECT count(*) FROM cdc_sync.conflicts WHERE kind = 'update_missing'") == 1
    assert dead_ids(site) == []


@pytest.fixture
def at_once(site: str) -> Iterator[SiteWriter]:
    """A writer that applies 20-change chunks at once (below its ahead_min_changes)."""
    w = SiteWriter(connect_site(site), "src")
    yield w
    w.conn.close()


def test_chunks_applied_at_once_share_savepoints(rows240: str, at_once: SiteWriter) -> None:
    """12 chunks applied at once: the first needs no savepoint, the 11 others share 2."""
    site = rows240
    before = _next_xid(site)
    _apply_in_one_transaction(at_once, _chunks(12))
    assert at_once.sent_ahead == 0
    assert _next_xid(site) - before == 1 + 2
    assert qty(site) == _expected(12)


@pytest.mark.parametrize("bad_chunk", [1, 2, 5, 9, 10, 12])
def test_chunks_applied_at_once_after_an_error_far_from_the_savepoint(
        rows240: str, at_once: SiteWriter, bad_chunk: int) -> None:
    """An error rolls back every chunk since savepoint cdc_chunk; they are applied again, so
    nothing is lost, and an earlier chunk's own dead letter is neither lost nor counted twice."""
    site = rows240
    bad = {3: 45, bad_chunk: 20 * bad_chunk - 15} if bad_chunk != 3 else {3: 45}
    _apply_in_one_transaction(at_once, _chunks(12, bad))
    assert dead_ids(site) == sorted(bad.values())
    assert at_once.dead_letters == len(bad)
    assert qty(site) == {**_expected(12), **{row: 0 for row in bad.values()}}


def test_chunks_applied_at_once_then_sent_ahead_then_an_error(site: str, rows240: str) -> None:
    """Chunks applied at once, then chunks sent ahead, then an error in a chunk applied at once
    again: each kind's savepoint undoes only its own chunks."""
    w = SiteWriter(connect_site(site), "src")
    try:
        chunks = _chunks(9, {9: 165})
        w.begin()
        for k, chunk in enumerate(chunks, 1):
            w.ahead_min_changes = 10 if k in (4, 5, 6) else 1000
            w.apply(chunk)
        w.commit(Lsn(0x100), NOW)
        assert w.sent_ahead == 3
    finally:
        w.conn.close()
    assert dead_ids(site) == [165]
    assert qty(site) == {**_expected(9), 165: 0}


def test_chunks_applied_at_once_around_a_subtransaction(rows240: str, at_once: SiteWriter) -> None:
    """A streamed subtransaction's savepoint between chunks applied at once: its rollback undoes
    only its own chunks, and a later error undoes only the chunks after it."""
    site = rows240
    chunks = _chunks(8, {8: 145})
    at_once.begin()
    for chunk in chunks[:3]:
        at_once.apply(chunk)
    at_once.savepoint("cdc_sub_1")
    for chunk in chunks[3:5]:
        at_once.apply(chunk)
    at_once.rollback_to("cdc_sub_1")
    for chunk in chunks[5:]:
        at_once.apply(chunk)
    at_once.commit(Lsn(0x100), NOW)
    expected = {**_expected(8), 145: 0}
    expected.update({i: 0 for i in range(61, 101)})  # chunks 4 and 5: rolled back
    assert qty(site) == expected
    assert dead_ids(site) == [145]


# -- statements parsed once (`AheadPipe` prepares them), small transactions included -----------

def prepared(writer: SiteWriter) -> list[tuple[str, str]]:
    rows = writer.conn.execute(
        "SELECT name, statement FROM pg_prepared_statements ORDER BY name").fetchall()
    writer.conn.rollback()
    return [(str(n), str(s)) for n, s in rows]


def test_small_transactions_parse_each_statement_once(site: str, writer: SiteWriter) -> None:
    for n in range(1, 7):  # six small target transactions of the same shape
        writer.begin()
        assert writer.apply(updates(range(n, n + 5), lambda i, n=n: i + n)) == 5
        writer.commit(Lsn(0x100 * n), NOW)
    assert writer.sent_ahead == 0
    assert qty(site)[10] == 16 and qty(site)[6] == 12
    assert scalar(site, "SELECT applied_lsn::text FROM cdc_sync.progress") == "0/600"
    statements = prepared(writer)
    # the update and the progress upsert, each prepared once, by the libpq pipeline
    assert [n for n, _ in statements] == ["cdc_ahead_0", "cdc_ahead_1"]
    assert statements[0][1].startswith('UPDATE "public"."item"')
    assert statements[1][1].startswith("INSERT INTO cdc_sync.progress")


def test_a_failed_preparation_is_made_again(site: str) -> None:
    conn = connect_site(site)
    conn.autocommit = True
    pipe = AheadPipe(conn)
    query = b"SELECT count(*) FROM later WHERE id > $1"
    pipe.send([(query, [b"0"])])
    (outcome,) = pipe.collect()
    assert isinstance(outcome.error, psycopg.errors.UndefinedTable)
    execute(site, "CREATE TABLE later (id int)", "INSERT INTO later VALUES (1), (2)")
    pipe.send([(query, [b"0"])])  # prepared again, not executed under a name that failed
    assert pipe.collect() == [Outcome(rows=1)]
    # a name once given is not given again (cdc_ahead_1 exists: the failed one was 0)
    pipe.send([(b"SELECT id FROM later WHERE id = $1", [b"2"])])
    assert pipe.collect() == [Outcome(rows=1)]
    pipe.close()
    conn.close()


def test_a_preparation_skipped_after_an_error_is_made_again(site: str) -> None:
    conn = connect_site(site)
    conn.autocommit = True
    pipe = AheadPipe(conn)
    bad = (b"SELECT 1 / $1::int", [b"0"])
    good = (b"SELECT id FROM item WHERE id <= $1", [b"3"])
    pipe.send([bad, good])  # `good` is prepared after the error: the server skips that
    first, second = pipe.collect()
    assert isinstance(first.error, psycopg.errors.DivisionByZero) and second.aborted
    pipe.send([good])
    assert pipe.collect() == [Outcome(rows=3)]
    pipe.close()
    conn.close()


def test_our_prepared_statements_survive_psycopg_rollbacks(site: str, writer: SiteWriter) -> None:
    writer.begin()
    writer.apply(updates(range(1, 6), lambda i: 1))
    writer.commit(Lsn(0x100), NOW)
    # psycopg prepares a statement run often enough (by default), and then sends DEALLOCATE ALL
    # after any rollback: that must not drop the writer's statements.
    for _ in range(8):
        writer.conn.execute("SELECT count(*) FROM item WHERE qty > %s", (0,))
    writer.conn.rollback()
    writer.begin()
    writer.apply(updates(range(1, 6), lambda i: 2))
    writer.conn.execute("SAVEPOINT s")
    writer.conn.execute("ROLLBACK TO SAVEPOINT s")
    writer.apply(updates(range(6, 11), lambda i: 3))
    writer.commit(Lsn(0x200), NOW)
    assert [qty(site)[i] for i in (1, 5, 6, 10)] == [2, 2, 3, 3]
    assert [n for n, _ in prepared(writer)] == ["cdc_ahead_0", "cdc_ahead_1"]

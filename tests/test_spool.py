"""`StreamSpool`: streamed chunks come back at commit as one ordinary transaction, in order,
with subtransaction and whole aborts applied, from files that are gone once read."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdc_sync.changes import (
    Change,
    Op,
    Table,
    TxBegin,
    TxChanges,
    TxCommit,
    TxItem,
    TxStreamAbort,
    TxStreamChanges,
    TxStreamCommit,
)
from cdc_sync.protocol import Lsn, ReplicaIdentity
from cdc_sync.spool import SpoolError, StreamSpool

T1 = Table(16401, "public", "grants", ("id", "amount", "note"), (23, 1700, 25), (-1, -1, -1),
           (0,), ReplicaIdentity.FULL)
T2 = Table(16402, "public", "lines", ("id", "grant_id"), (23, 23), (-1, -1), (0,),
           ReplicaIdentity.DEFAULT)
TS = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)


def row(pos: int, table: Table = T1, op: Op = Op.INSERT) -> Change:
    new = None if op is Op.DELETE else (str(pos), "1.50", None)
    old = (str(pos), "1.00", "x") if op is not Op.INSERT else None
    return Change(op, pos, table, new, old, False)


def chunk(xid: int, sub: int, positions: range, table: Table = T1,
          op: Op = Op.INSERT) -> TxStreamChanges:
    return TxStreamChanges(xid, sub, tuple(row(p, table, op) for p in positions))


def committed(spool: StreamSpool, xid: int, origin: str | None = None) -> list[TxItem]:
    return list(spool.commit(TxStreamCommit(xid, Lsn(100), Lsn(108), TS, origin)))


def changes_of(items: list[TxItem]) -> list[Change]:
    return [c for i in items if isinstance(i, TxChanges) for c in i.changes]


def test_commit_gives_back_one_ordinary_transaction_in_source_order() -> None:
    spool = StreamSpool()
    sent = [chunk(7, 7, range(0, 3)), chunk(7, 7, range(3, 5), T2, Op.UPDATE),
            chunk(7, 7, range(5, 6), T1, Op.DELETE)]
    for c in sent:
        spool.add(c)
    items = committed(spool, 7, origin="berlin")
    assert items[0] == TxBegin(7, Lsn(100), TS, "berlin")
    assert items[-1] == TxCommit(Lsn(100), Lsn(108), TS)
    assert len(items) == 2 + len(sent)  # chunk boundaries kept: bounded memory downstream
    got = changes_of(items)
    assert got == [c for s in sent for c in s.changes]
    # The very Table objects (sites cache plans by table), not copies.
    assert got[0].table is T1 and got[3].table is T2
    assert spool.open_transactions == 0


def test_interleaved_transactions_stay_apart() -> None:
    spool = StreamSpool()
    spool.add(chunk(7, 7, range(0, 2)))
    spool.add(chunk(9, 9, range(0, 4), T2))
    spool.add(chunk(7, 7, range(2, 3)))
    assert spool.open_transactions == 2
    nine = changes_of(committed(spool, 9))
    seven = changes_of(committed(spool, 7))
    assert [c.position for c in seven] == [0, 1, 2] and {c.table for c in seven} == {T1}
    assert [c.position for c in nine] == [0, 1, 2, 3] and {c.table for c in nine} == {T2}


def test_subtransaction_abort_drops_it_and_what_followed_it() -> None:
    spool = StreamSpool()
    spool.add(chunk(7, 7, range(0, 2)))
    spool.add(chunk(7, 8, range(2, 4)))  # SAVEPOINT a
    spool.add(chunk(7, 9, range(4, 5)))  # SAVEPOINT a_inner, inside a
    spool.abort(TxStreamAbort(7, 8))     # ROLLBACK TO a: both gone
    spool.add(chunk(7, 7, range(5, 6)))
    spool.add(chunk(7, 10, range(6, 8)))
    spool.abort(TxStreamAbort(7, 11))    # a subtransaction that streamed nothing
    assert [c.position for c in changes_of(committed(spool, 7))] == [0, 1, 5, 6, 7]


def test_abort_of_the_transaction_drops_it_whole() -> None:
    spool = StreamSpool()
    spool.add(chunk(7, 7, range(0, 2)))
    spool.abort(TxStreamAbort(7, 7))
    assert spool.open_transactions == 0
    assert changes_of(committed(spool, 7)) == []
    spool.abort(TxStreamAbort(12, 12))  # never seen: nothing to do


def test_truncates_and_messages_round_trip() -> None:
    spool = StreamSpool()
    other = (Change(Op.TRUNCATE, 0, truncated=(T1, T2), truncate_options=1),
             Change(Op.MESSAGE, 1, prefix="app", content=b"\x00hi"), row(2))
    spool.add(TxStreamChanges(7, 7, other))
    assert changes_of(committed(spool, 7)) == list(other)


def test_reset_forgets_everything_and_closes_the_files(tmp_path: Path) -> None:
    spool = StreamSpool(str(tmp_path))
    spool.add(chunk(7, 7, range(0, 1000)))
    assert spool.spooled_bytes() > 0
    fd = spool._open[7].file.fileno()
    spool.reset()
    assert spool.open_transactions == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # closed (and, anonymous, gone from the disk)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    spool = StreamSpool(str(tmp_path / "missing"))
    with pytest.raises(SpoolError, match=r"^cannot spool streamed transaction 7: "):
        spool.add(chunk(7, 7, range(0, 1)))

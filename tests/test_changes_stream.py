"""Assembler on streamed in-progress transactions (protocol 2): TxStreamChanges /
TxStreamCommit / TxStreamAbort from synthetic message sequences and from the frames captured
by tests/protocol/capture_stream_payloads.py; and `feed_row`, the fused hot path, against
`feed(decode_message(...))`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cdc_sync.changes import (
    Assembler,
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
from cdc_sync.protocol import (
    ROW_TAGS,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Lsn,
    Message,
    OldTupleKind,
    Origin,
    PgOutputMessage,
    ProtocolError,
    Relation,
    ReplicaIdentity,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    XLogData,
    decode_copy_data,
    decode_message,
    decode_streamed,
    pg_timestamp_to_datetime,
)

PROTOCOL = Path(__file__).parent / "protocol"
_STREAM_DOC: dict[str, Any] = json.loads((PROTOCOL / "captured_stream.json").read_text())
_PROTO1_DOC: dict[str, Any] = json.loads((PROTOCOL / "captured.json").read_text())
XIDS: dict[str, int] = _STREAM_DOC["xids"]

REL = Relation(1, "public", "t", ReplicaIdentity.DEFAULT,
               (Column(1, "id", 23, -1), Column(0, "v", 25, -1)))
TABLE = Table.from_relation(REL)
AUX = Relation(2, "public", "aux", ReplicaIdentity.DEFAULT, (Column(1, "id", 23, -1),))
TS = 800_000_000_000_000
STOP = StreamStop()

Event = PgOutputMessage | tuple[int | None, PgOutputMessage]


def ins(i: int) -> Insert:
    return Insert(1, (str(i), f"v{i}"))


def ch(pos: int, i: int) -> Change:
    """The Change of `ins(i)` at `pos`."""
    return Change(Op.INSERT, pos, TABLE, new=(str(i), f"v{i}"))


def run(asm: Assembler, events: Sequence[Event]) -> list[TxItem]:
    """Feed `events`: `(xid, msg)` pairs inside stream blocks (via `feed_streamed`), plain
    messages elsewhere (via `feed`); a plain message inside a block has no xid."""
    out: list[TxItem] = []
    for ev in events:
        if asm.in_stream_block:
            xid, msg = ev if isinstance(ev, tuple) else (None, ev)
            out += asm.feed_streamed(xid, msg)
        else:
            assert not isinstance(ev, tuple), ev
            out += asm.feed(ev)
    return out


def block(xid: int, first: bool, *rows: tuple[int, int], relation: bool = False) -> list[Event]:
    """A Stream Start/Stop block of `xid` with inserts `(subxid, i)`."""
    events: list[Event] = [StreamStart(xid, first)]
    if relation:
        events.append((xid, REL))
    events += [(sub, ins(i)) for sub, i in rows]
    events.append(STOP)
    return events


# --- synthetic sequences ------------------------------------------------------------------


def test_chunks_carry_xid_and_subxid_and_are_cut_when_the_subxid_changes() -> None:
    asm = Assembler()
    assert run(asm, [StreamStart(100, True), (100, REL), (100, ins(1)), (100, ins(2))]) == []
    assert asm.in_stream_block
    # The subxid changes: the chunk of the top level so far is complete.
    assert run(asm, [(101, ins(3))]) == [TxStreamChanges(100, 100, (ch(0, 1), ch(1, 2)), True)]
    assert run(asm, [(101, ins(4))]) == []
    assert run(asm, [(100, ins(5))]) == [TxStreamChanges(100, 101, (ch(2, 3), ch(3, 4)))]
    assert run(asm, [(102, ins(6))]) == [TxStreamChanges(100, 100, (ch(4, 5),))]
    assert run(asm, [STOP]) == [TxStreamChanges(100, 102, (ch(5, 6),))]
    assert not asm.in_stream_block
    assert asm.open_streams == 1


def test_chunks_are_cut_at_chunk_size_and_stream_stop() -> None:
    asm = Assembler(chunk_size=3)
    out = run(asm, [StreamStart(7, True), (7, REL)])
    per_event = [asm.feed_streamed(7, ins(i)) for i in range(7)]
    assert [len(x) for x in per_event] == [0, 0, 1, 0, 0, 1, 0]
    out += [item for x in per_event for item in x]
    out += asm.feed_streamed(None, STOP)
    assert out == [TxStreamChanges(7, 7, (ch(0, 0), ch(1, 1), ch(2, 2)), True),
                   TxStreamChanges(7, 7, (ch(3, 3), ch(4, 4), ch(5, 5))),
                   TxStreamChanges(7, 7, (ch(6, 6),))]
    # A block without changes gives nothing.
    assert run(asm, [StreamStart(7, False), STOP]) == []


def test_chunks_are_cut_at_chunk_bytes() -> None:
    asm = Assembler(chunk_bytes=100)
    run(asm, [StreamStart(7, True), (7, REL)])
    sizes = [asm.feed_streamed(7, ins(i), 60) for i in range(4)]
    assert [len(x) for x in sizes] == [0, 1, 0, 1]
    assert run(asm, [STOP]) == []


def test_positions_continue_across_blocks_and_interleaved_transactions() -> None:
    asm = Assembler()
    out = run(asm, block(100, True, (100, 1), (100, 2), (101, 3), relation=True))
    assert out == [TxStreamChanges(100, 100, (ch(0, 1), ch(1, 2)), True),
                   TxStreamChanges(100, 101, (ch(2, 3),))]
    # An ordinary transaction between two blocks counts its own positions from 0.
    out = run(asm, [Begin(Lsn(0x50), TS, 300), REL, ins(9), Commit(0, Lsn(0x50), Lsn(0x58), TS)])
    assert out == [TxBegin(300, Lsn(0x50), pg_timestamp_to_datetime(TS), None),
                   TxChanges((ch(0, 9),)), TxCommit(Lsn(0x50), Lsn(0x58),
                                                    pg_timestamp_to_datetime(TS))]
    # Another streamed transaction starts at 0; the first one goes on at 3.
    out = run(asm, block(200, True, (200, 20), (200, 21)))
    assert out == [TxStreamChanges(200, 200, (ch(0, 20), ch(1, 21)), True)]
    assert asm.open_streams == 2
    out = run(asm, block(100, False, (101, 4), (100, 5)))
    assert out == [TxStreamChanges(100, 101, (ch(3, 4),)), TxStreamChanges(100, 100, (ch(4, 5),))]
    out = run(asm, block(200, False, (200, 22)))
    assert out == [TxStreamChanges(200, 200, (ch(2, 22),))]


def test_stream_commit_gives_its_lsns_and_time_and_forgets_the_transaction() -> None:
    asm = Assembler()
    run(asm, block(100, True, (100, 1), relation=True))
    run(asm, block(200, True, (200, 2)))
    assert asm.open_streams == 2
    out = run(asm, [StreamCommit(100, 0, Lsn(0x1000), Lsn(0x1040), TS + 5)])
    assert out == [TxStreamCommit(100, Lsn(0x1000), Lsn(0x1040), pg_timestamp_to_datetime(TS + 5))]
    assert asm.open_streams == 1
    # Its later blocks are no longer expected: one without a first segment is an error.
    with pytest.raises(ProtocolError, match="first segment"):
        run(asm, [StreamStart(100, False)])
    # The other transaction is untouched.
    assert run(asm, block(200, False, (200, 3))) == [TxStreamChanges(200, 200, (ch(1, 3),))]
    out = run(asm, [StreamCommit(200, 0, Lsn(0x2000), Lsn(0x2010), TS + 6)])
    assert out == [TxStreamCommit(200, Lsn(0x2000), Lsn(0x2010), pg_timestamp_to_datetime(TS + 6))]
    assert asm.open_streams == 0


def test_a_subtransaction_abort_keeps_the_transaction_open() -> None:
    asm = Assembler()
    run(asm, block(100, True, (100, 1), (101, 2), relation=True))
    assert run(asm, [StreamAbort(100, 101)]) == [TxStreamAbort(100, 101)]
    assert asm.open_streams == 1
    # The next block continues (no first segment needed) and so do the positions.
    assert run(asm, block(100, False, (100, 3))) == [TxStreamChanges(100, 100, (ch(2, 3),))]
    assert run(asm, [StreamCommit(100, 0, Lsn(16), Lsn(32), TS)]) == [
        TxStreamCommit(100, Lsn(16), Lsn(32), pg_timestamp_to_datetime(TS))]
    assert asm.open_streams == 0


def test_a_top_level_abort_closes_the_transaction() -> None:
    asm = Assembler()
    run(asm, block(100, True, (100, 1), relation=True))
    assert run(asm, [StreamAbort(100, 100)]) == [TxStreamAbort(100, 100)]
    assert asm.open_streams == 0
    with pytest.raises(ProtocolError, match="without its first segment"):
        run(asm, [StreamStart(100, False)])


def test_a_later_block_of_an_unknown_transaction_is_an_error() -> None:
    asm = Assembler()
    with pytest.raises(ProtocolError, match="Stream Start of transaction 5 without its first"):
        asm.feed(StreamStart(5, False))
    assert not asm.in_stream_block


@pytest.mark.parametrize("control", [StreamStart(100, True), StreamStart(100, False),
                                     StreamCommit(100, 0, Lsn(1), Lsn(2), TS),
                                     StreamAbort(100, 100), StreamAbort(100, 101)],
                         ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("announced", [False, True])
def test_stream_control_inside_an_open_transaction_is_an_error(
        control: PgOutputMessage, announced: bool) -> None:
    asm = Assembler()
    run(asm, block(100, True, (100, 1), relation=True))
    run(asm, [Begin(Lsn(0x50), TS, 300)])
    if announced:  # after a change: TxBegin has gone out
        run(asm, [ins(2)])
    with pytest.raises(ProtocolError, match="inside an open transaction"):
        asm.feed(control)


def test_relation_type_and_origin_inside_a_block() -> None:
    asm = Assembler()
    wider = Relation(1, "public", "t", ReplicaIdentity.FULL,
                     (Column(1, "id", 23, -1), Column(0, "v", 25, -1), Column(0, "w", 25, -1)))
    typ = Type(9000, "public", "mood")
    out = run(asm, [StreamStart(100, True), (100, REL), (100, typ), Origin(Lsn(7), "o1"),
                    (100, ins(1)), (101, wider), (101, Insert(1, ("2", "b", "c"))), STOP])
    assert asm.tables[1] == Table.from_relation(wider)
    assert asm.types[9000] == typ
    assert asm.stream_origins == {100: "o1"}
    assert out == [TxStreamChanges(100, 100, (ch(0, 1),), True),
                   TxStreamChanges(100, 101, (Change(Op.INSERT, 1, Table.from_relation(wider),
                                                     new=("2", "b", "c")),))]
    second = out[1]
    assert isinstance(second, TxStreamChanges) and second.changes[0].table is not None
    assert second.changes[0].table.columns == ("id", "v", "w")
    run(asm, [StreamCommit(100, 0, Lsn(1), Lsn(2), TS)])
    assert asm.stream_origins == {}


def test_truncate_message_update_and_delete_inside_a_block() -> None:
    asm = Assembler()
    msg = Message(1, Lsn(5), "p", b"hello")
    out = run(asm, [StreamStart(100, True), (100, REL), (100, AUX),
                    (100, Update(1, OldTupleKind.KEY, ("1", None), ("2", "x"))),
                    (100, Delete(1, OldTupleKind.OLD, ("3", "y"))),
                    (100, Truncate(3, (2, 1))), (100, msg), STOP])
    aux = Table.from_relation(AUX)
    assert out == [TxStreamChanges(100, 100, (
        Change(Op.UPDATE, 0, TABLE, new=("2", "x"), old=("1", None), old_is_key=True),
        Change(Op.DELETE, 1, TABLE, old=("3", "y"), old_is_key=False),
        Change(Op.TRUNCATE, 2, truncated=(aux, TABLE), truncate_options=3),
        Change(Op.MESSAGE, 3, prefix="p", content=b"hello"),
    ), True)]


def test_misplaced_messages_around_blocks() -> None:
    asm = Assembler()
    with pytest.raises(ProtocolError, match="outside a Stream Start/Stop block"):
        asm.feed_streamed(100, ins(1))
    run(asm, [StreamStart(100, True), (100, REL)])
    for msg in (Begin(Lsn(1), TS, 5), Commit(0, Lsn(1), Lsn(2), TS), StreamStart(100, False),
                StreamCommit(100, 0, Lsn(1), Lsn(2), TS), StreamAbort(100, 100)):
        with pytest.raises(ProtocolError, match="inside a block of streamed changes"):
            asm.feed_streamed(None, msg)
    with pytest.raises(ProtocolError, match="before its Relation"):
        asm.feed_streamed(100, Insert(77, ("1",)))


def test_reset_forgets_open_streams() -> None:
    asm = Assembler()
    run(asm, block(100, True, (100, 1), relation=True))
    run(asm, [StreamStart(100, False), (100, ins(2))])
    asm.reset()
    assert not asm.in_stream_block and asm.open_streams == 0
    with pytest.raises(ProtocolError):
        asm.feed(StreamStart(100, False))


# --- the captured stream ------------------------------------------------------------------


def captured_stream() -> list[tuple[bool, bytes]]:
    """(inside a stream block, payload) for every captured protocol-2 message."""
    out = []
    in_block = False
    for m in _STREAM_DOC["messages"]:
        raw = bytes.fromhex(m["hex"])
        msg = decode_streamed(raw)[1] if in_block else decode_message(raw)
        out.append((in_block, raw))
        if isinstance(msg, StreamStart):
            in_block = True
        elif isinstance(msg, StreamStop):
            in_block = False
    return out


def assemble_stream(chunk_size: int = 5000, *, rows: bool) -> list[TxItem]:
    """Every captured payload through `feed`/`feed_streamed`, or with `rows` the row changes
    through `feed_row` (the pipeline's hot path)."""
    asm = Assembler(chunk_size=chunk_size)
    out: list[TxItem] = []
    for in_block, raw in captured_stream():
        assert asm.in_stream_block == in_block
        if rows and raw[0] in ROW_TAGS:
            out += asm.feed_row(raw)
        elif in_block:
            xid, msg = decode_streamed(raw)
            out += asm.feed_streamed(xid, msg, len(raw))
        else:
            out += asm.feed(decode_message(raw), len(raw))
    assert asm.open_streams == 0 and not asm.in_stream_block and not asm.in_transaction
    return out


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5000])
def test_feed_row_and_feed_streamed_give_the_same_items(chunk_size: int) -> None:
    assert assemble_stream(chunk_size, rows=True) == assemble_stream(chunk_size, rows=False)


def test_captured_stream_items() -> None:
    items = assemble_stream(rows=True)
    a, c, d = XIDS["A"], XIDS["C"], XIDS["D"]
    sub_rb, sub_rel = XIDS["A_rolled_back_sub"], XIDS["A_released_sub"]

    def summary(item: TxItem) -> tuple[object, ...]:
        if isinstance(item, TxStreamChanges):
            return ("chunk", item.xid, item.subxid)
        return (type(item).__name__, getattr(item, "xid", None), getattr(item, "subxid", None))

    collapsed: list[tuple[object, ...]] = []
    for item in items:
        s = summary(item)
        if not collapsed or collapsed[-1] != s:
            collapsed.append(s)
    assert collapsed == [
        ("chunk", a, a), ("chunk", a, sub_rb), ("TxStreamAbort", a, sub_rb),
        ("TxBegin", XIDS["B"], None), ("TxChanges", None, None), ("TxCommit", None, None),
        ("chunk", a, sub_rel), ("chunk", a, a), ("TxStreamCommit", a, None),
        ("chunk", c, c), ("TxStreamAbort", c, c),
        ("chunk", d, d), ("TxStreamCommit", d, None),
        ("TxBegin", 0, None), ("TxChanges", None, None), ("TxCommit", None, None),
    ]

    chunks = [i for i in items if isinstance(i, TxStreamChanges)]
    # Exactly the first chunk of each streamed transaction is marked first.
    firsts = [(i.xid, i.first) for i in chunks]
    assert [x for x, f in firsts if f] == [a, c, d]
    assert all(firsts[[x for x, _ in firsts].index(x)][1] for x in (a, c, d))
    # Positions of each transaction go on across its chunks and blocks without a gap.
    for xid in (a, c, d):
        positions = [c_.position for i in chunks if i.xid == xid for c_ in i.changes]
        assert positions == list(range(len(positions)))
        assert len(positions) >= 12

    changes_a = [c_ for i in chunks if i.xid == a for c_ in i.changes]
    message = next(c_ for c_ in changes_a if c_.op is Op.MESSAGE)
    assert (message.prefix, message.content) == ("cdc_stream", b"inside A")
    key_update = next(c_ for c_ in changes_a if c_.op is Op.UPDATE)
    assert key_update.old_is_key and key_update.old == ("1", None)
    assert key_update.new == ("900001", "row 1")
    delete = next(c_ for c_ in changes_a if c_.op is Op.DELETE)
    assert delete.old_is_key and delete.old == ("2", None)
    truncate = next(c_ for c_ in changes_a if c_.op is Op.TRUNCATE)
    assert [t.qualified for t in truncate.truncated] == ["cdc_stream.aux"]

    decoded = [decode_message(raw) for in_block, raw in captured_stream() if not in_block]
    stream_commits = [m for m in decoded if isinstance(m, StreamCommit)]
    assert [i for i in items if isinstance(i, TxStreamCommit)] == [
        TxStreamCommit(m.xid, m.commit_lsn, m.end_lsn, pg_timestamp_to_datetime(m.commit_ts))
        for m in stream_commits]


# --- feed_row in ordinary transactions (protocol 1 capture) -------------------------------


def proto1_payloads(session: str) -> list[bytes]:
    out = []
    for frame in _PROTO1_DOC["frames"]:
        if frame["session"] != session:
            continue
        decoded = decode_copy_data(bytes.fromhex(frame["hex"]))
        if isinstance(decoded, XLogData):
            out.append(bytes(decoded.data))
    return out


def assemble_proto1(session: str, chunk_size: int, *, rows: bool) -> list[TxItem]:
    asm = Assembler(chunk_size=chunk_size)
    out: list[TxItem] = []
    for raw in proto1_payloads(session):
        if rows and raw[0] in ROW_TAGS:
            out += asm.feed_row(raw)
        else:
            out += asm.feed(decode_message(raw), len(raw))
    return out


@pytest.mark.parametrize("session", ["text", "binary"])
@pytest.mark.parametrize("chunk_size", [1, 2, 5000])
def test_feed_row_gives_the_same_items_as_feed_decode_message(session: str,
                                                              chunk_size: int) -> None:
    fused = assemble_proto1(session, chunk_size, rows=True)
    assert fused == assemble_proto1(session, chunk_size, rows=False)
    changes = [c for i in fused if isinstance(i, TxChanges) for c in i.changes]
    if session == "text":
        # The capture has every kind of old tuple: key ('K') and whole row ('O').
        assert any(c.op is Op.UPDATE and c.old_is_key for c in changes)
        assert any(c.op is Op.UPDATE and c.old is not None and not c.old_is_key for c in changes)
        assert any(c.op is Op.UPDATE and c.old is None for c in changes)
        assert any(c.op is Op.DELETE and c.old_is_key for c in changes)
        assert any(c.op is Op.DELETE and not c.old_is_key for c in changes)
        assert sum(c.op is Op.INSERT for c in changes) >= 10


def test_feed_row_items_are_plain_changes() -> None:
    items = assemble_proto1("text", 5000, rows=True)
    for item in items:
        if isinstance(item, TxChanges):
            for c in item.changes:
                assert type(c) is Change
                assert c == Change(*c)  # all ten fields present
                if c.op in (Op.INSERT, Op.UPDATE, Op.DELETE):
                    assert c.truncated == () and c.prefix == "" and c.content == b""


# --- regressions of bugs found by these tests ---

_INSERT_2 = b"I" + (1).to_bytes(4, "big") + b"N" + (1).to_bytes(2, "big") + b"t" + \
    (1).to_bytes(4, "big") + b"2"


@pytest.mark.parametrize("fused", [False, True], ids=["feed", "feed_row"])
def test_a_row_change_after_commit_is_outside_a_transaction(fused: bool) -> None:
    rel = Relation(1, "public", "t", ReplicaIdentity.DEFAULT, (Column(1, "id", 23, -1),))
    asm = Assembler()
    run(asm, [Begin(Lsn(1), TS, 5), rel, Insert(1, ("1",)), Commit(0, Lsn(1), Lsn(2), TS)])
    assert decode_message(_INSERT_2) == Insert(1, ("2",))
    with pytest.raises(ProtocolError, match="outside a transaction"):
        if fused:
            asm.feed_row(_INSERT_2)
        else:
            asm.feed(Insert(1, ("2",)))


def test_the_first_chunk_is_marked_first_after_an_empty_first_block() -> None:
    asm = Assembler()
    out = run(asm, [StreamStart(100, True), STOP, *block(100, False, (100, 1), relation=True)])
    assert out == [TxStreamChanges(100, 100, (ch(0, 1),), True)]

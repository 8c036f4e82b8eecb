"""Protocol 2 (`streaming 'on'`): decode_message / decode_streamed / decode_row on pgoutput
messages captured from PostgreSQL 15 (`captured_stream.json`, written by
`capture_stream_payloads.py`), and on broken ones."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cdc_sync.protocol import (
    ROW_TAGS,
    Begin,
    Commit,
    Delete,
    Insert,
    Lsn,
    Message,
    OldTupleKind,
    PgOutputMessage,
    ProtocolError,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Update,
    decode_message,
    decode_row,
    decode_streamed,
)

_DOC: dict[str, Any] = json.loads(Path(__file__).with_name("captured_stream.json").read_text())
XIDS: dict[str, int] = _DOC["xids"]
SCHEMA = "cdc_stream"


@dataclass(frozen=True)
class Decoded:
    seq: int
    step: str
    block: int | None  # stream block number, None outside blocks
    raw: bytes
    xid: int | None  # the xid decode_streamed read (None outside blocks or for Stream Stop)
    msg: PgOutputMessage


def decode_capture() -> list[Decoded]:
    """Every captured payload decoded as a client must: `decode_streamed` between a Stream
    Start and its Stream Stop, `decode_message` elsewhere."""
    out: list[Decoded] = []
    in_block = False
    for m in _DOC["messages"]:
        raw = bytes.fromhex(m["hex"])
        xid: int | None
        if in_block:
            xid, msg = decode_streamed(raw)
        else:
            xid, msg = None, decode_message(raw)
        if isinstance(msg, StreamStart):
            in_block = True
        elif isinstance(msg, StreamStop):
            in_block = False
        out.append(Decoded(m["seq"], m["step"], m["block"], raw, xid, msg))
    return out


CAPTURE = decode_capture()


def first_of(cls: type, *, step: str | None = None, streamed: bool | None = None) -> Decoded:
    for d in CAPTURE:
        if isinstance(d.msg, cls) and (step is None or d.step == step) and (
                streamed is None or (d.block is not None) == streamed):
            return d
    raise AssertionError(f"no {cls.__name__} captured")


# --- the captured stream ---------------------------------------------------------------------


def test_capture_is_protocol_2_streaming_from_pg15() -> None:
    assert _DOC["server_version"].startswith("15")
    assert "proto_version '2'" in _DOC["start_replication"]
    assert "streaming 'on'" in _DOC["start_replication"]
    kinds = {type(d.msg).__name__ for d in CAPTURE}
    assert kinds >= {"StreamStart", "StreamStop", "StreamCommit", "StreamAbort", "Begin",
                     "Commit", "Relation", "Insert", "Update", "Delete", "Truncate", "Message"}
    # The seq numbers are those of the full stream, increasing; the JSON is a subset.
    seqs = [d.seq for d in CAPTURE]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0
    assert _DOC["total_messages"] == seqs[-1] + 1 > len(seqs)


def test_blocks_nest_properly_and_notes_match() -> None:
    in_block: int | None = None
    starts = 0
    for d in CAPTURE:
        assert d.raw[0] == ord(_DOC["messages"][CAPTURE.index(d)]["note"][0])
        if isinstance(d.msg, StreamStart):
            assert in_block is None, "Stream Start inside a block"
            in_block = d.block
            assert d.block == starts
            starts += 1
        elif isinstance(d.msg, StreamStop):
            assert in_block is not None and d.block == in_block
            in_block = None
        elif isinstance(d.msg, (StreamCommit, StreamAbort, Begin, Commit)):
            assert in_block is None and d.block is None, d
        else:
            assert d.block == in_block
    assert in_block is None
    assert starts >= 9  # A, C and D are each streamed in several blocks


def test_stream_start_first_segment_only_on_each_transactions_first_block() -> None:
    seen: set[int] = set()
    starts = [d.msg for d in CAPTURE if isinstance(d.msg, StreamStart)]
    for start in starts:
        assert start.first_segment == (start.xid not in seen)
        seen.add(start.xid)
    assert seen == {XIDS["A"], XIDS["C"], XIDS["D"]}
    assert sum(s.first_segment for s in starts) == 3
    assert sum(not s.first_segment for s in starts) >= 6


def test_xids_of_streamed_changes_are_the_top_xid_or_a_subxid() -> None:
    subxids = {XIDS["A"]: {XIDS["A_rolled_back_sub"], XIDS["A_released_sub"]},
               XIDS["C"]: set(), XIDS["D"]: set()}
    top: int | None = None
    seen_xids: dict[int, set[int]] = {x: set() for x in subxids}
    for d in CAPTURE:
        if isinstance(d.msg, StreamStart):
            top = d.msg.xid
        elif isinstance(d.msg, StreamStop):
            top = None
        elif top is not None:
            assert d.raw[:1] in (b"R", b"Y", b"I", b"U", b"D", b"T", b"M")
            assert d.xid is not None
            assert d.xid == top or d.xid in subxids[top], d
            seen_xids[top].add(d.xid)
        else:
            assert d.xid is None
    assert seen_xids[XIDS["A"]] == {XIDS["A"], XIDS["A_rolled_back_sub"], XIDS["A_released_sub"]}
    assert seen_xids[XIDS["C"]] == {XIDS["C"]}
    assert seen_xids[XIDS["D"]] == {XIDS["D"]}


def test_stream_aborts_of_a_subtransaction_and_of_a_whole_transaction() -> None:
    aborts = [d for d in CAPTURE if isinstance(d.msg, StreamAbort)]
    assert [(d.step, d.msg) for d in aborts] == [
        ("A", StreamAbort(XIDS["A"], XIDS["A_rolled_back_sub"])),
        ("C", StreamAbort(XIDS["C"], XIDS["C"])),
    ]
    sub_abort = aborts[0]
    assert isinstance(sub_abort.msg, StreamAbort)
    assert sub_abort.msg.subxid != sub_abort.msg.xid
    # The rolled-back subtransaction's changes were streamed before its abort, none after.
    idx = CAPTURE.index(sub_abort)
    assert any(d.xid == XIDS["A_rolled_back_sub"] for d in CAPTURE[:idx])
    assert all(d.xid != XIDS["A_rolled_back_sub"] for d in CAPTURE[idx:])
    # A continues after its subtransaction's abort; C never streams again after its abort.
    assert any(isinstance(d.msg, StreamStart) and d.msg.xid == XIDS["A"]
               for d in CAPTURE[idx:])
    c_idx = CAPTURE.index(aborts[1])
    assert all(not (isinstance(d.msg, StreamStart) and d.msg.xid == XIDS["C"])
               for d in CAPTURE[c_idx:])


def test_commits_are_ordered_and_the_small_transaction_interleaves() -> None:
    commits: list[tuple[str, Lsn, Lsn, int]] = []
    for d in CAPTURE:
        if isinstance(d.msg, (StreamCommit, Commit)):
            commits.append((d.step, d.msg.commit_lsn, d.msg.end_lsn, d.msg.commit_ts))
        if isinstance(d.msg, StreamCommit):
            assert d.msg.flags == 0
            assert isinstance(d.msg.commit_lsn, Lsn) and isinstance(d.msg.end_lsn, Lsn)
            assert d.msg.xid == XIDS[d.step]
    assert [c[0] for c in commits] == ["B", "A", "D"]
    for _, commit_lsn, end_lsn, _ in commits:
        assert commit_lsn <= end_lsn
    assert [c[1] for c in commits] == sorted(c[1] for c in commits)
    assert len({c[1] for c in commits}) == 3
    assert [c[3] for c in commits] == sorted(c[3] for c in commits)
    # B sits between two blocks of A: A streamed before B began and after B committed.
    steps = [(d.step, type(d.msg).__name__) for d in CAPTURE]
    b_begin = steps.index(("B", "Begin"))
    b_commit = steps.index(("B", "Commit"))
    assert ("A", "StreamStop") in steps[:b_begin]
    assert ("A", "StreamStart") in steps[b_commit:]
    begin = CAPTURE[b_begin].msg
    assert isinstance(begin, Begin) and begin.xid == XIDS["B"]
    assert begin.final_lsn == commits[0][1]


def test_changes_of_the_large_committed_transaction() -> None:
    a = [d for d in CAPTURE if d.step == "A" and d.block is not None]
    rel = next(d.msg for d in a if isinstance(d.msg, Relation) and d.msg.name == "items")
    assert isinstance(rel, Relation) and rel.namespace == SCHEMA
    assert [c.name for c in rel.columns] == ["id", "label"]
    assert [c.is_key for c in rel.columns] == [True, False]

    first_insert = next(d for d in a if isinstance(d.msg, Insert))
    assert first_insert.msg == Insert(rel.oid, ("1", "row 1"))
    assert first_insert.xid == XIDS["A"]
    sub_rows = [d.msg for d in a if d.xid == XIDS["A_rolled_back_sub"] and
                isinstance(d.msg, Insert)]
    assert sub_rows and all(100001 <= int(str(r.new[0])) <= 100800 for r in sub_rows)

    message = next(d for d in a if isinstance(d.msg, Message))
    assert isinstance(message.msg, Message)
    assert message.msg == Message(1, message.msg.lsn, SCHEMA, b"inside A")
    assert message.msg.transactional and message.xid == XIDS["A"]

    update = next(d for d in a if isinstance(d.msg, Update))
    assert update.msg == Update(rel.oid, OldTupleKind.KEY, ("1", None), ("900001", "row 1"))
    delete = next(d for d in a if isinstance(d.msg, Delete))
    assert delete.msg == Delete(rel.oid, OldTupleKind.KEY, ("2", None))
    truncate = next(d for d in a if isinstance(d.msg, Truncate))
    aux = next(d.msg for d in a if isinstance(d.msg, Relation) and d.msg.name == "aux")
    assert isinstance(aux, Relation)
    assert truncate.msg == Truncate(0, (aux.oid,))
    assert update.xid == delete.xid == truncate.xid == XIDS["A"]

    d_updates = [d.msg for d in CAPTURE if d.step == "D" and isinstance(d.msg, Update)]
    assert d_updates[0] == Update(rel.oid, None, None, ("3", "row 3!"))
    assert d_updates[-1] == Update(rel.oid, None, None, ("1002", "row 1002!"))
    end = CAPTURE[-1].msg
    assert isinstance(end, Message)
    assert end == Message(0, end.lsn, SCHEMA, b"end")


def test_decode_row_agrees_with_decode_streamed() -> None:
    checked = {True: 0, False: 0}
    for d in CAPTURE:
        if d.raw[0] not in ROW_TAGS:
            continue
        streamed = d.block is not None
        xid, tag, oid, action, old, new = decode_row(d.raw, streamed=streamed)
        assert xid == d.xid
        assert tag == d.raw[0]
        msg = d.msg
        if isinstance(msg, Insert):
            assert (oid, action, old, new) == (msg.relation_oid, ord("N"), None, msg.new)
        elif isinstance(msg, Update):
            kind = ord("N") if msg.old_kind is None else msg.old_kind.value[0]
            assert (oid, action, old, new) == (msg.relation_oid, kind, msg.old, msg.new)
        else:
            assert isinstance(msg, Delete)
            assert (oid, action, old, new) == (msg.relation_oid, msg.old_kind.value[0], msg.old,
                                               None)
        checked[streamed] += 1
    assert checked[True] >= 40 and checked[False] >= 1


def test_decode_streamed_without_an_xid() -> None:
    assert decode_streamed(b"E") == (None, StreamStop())
    origin = b"O" + struct.pack("!Q", 5) + b"o1\x00"
    xid, msg = decode_streamed(origin)
    assert xid is None and msg == decode_message(origin)
    with pytest.raises(ProtocolError) as info:
        decode_streamed(b"")
    assert info.value.offset == 0


# --- broken messages ------------------------------------------------------------------------


def control_messages() -> list[Decoded]:
    out = [first_of(StreamStart), first_of(StreamStop), first_of(StreamCommit)]
    out.append(next(d for d in CAPTURE if isinstance(d.msg, StreamAbort)))
    return out


@pytest.mark.parametrize("d", control_messages(), ids=lambda d: type(d.msg).__name__)
def test_every_truncation_of_a_stream_control_message(d: Decoded) -> None:
    raw = d.raw
    assert decode_message(raw) == d.msg
    sizes = {StreamStart: 6, StreamStop: 1, StreamCommit: 30, StreamAbort: 9}
    assert len(raw) == sizes[type(d.msg)]
    for n in range(len(raw)):
        for decode in (decode_message, decode_streamed):
            with pytest.raises(ProtocolError) as info:
                decode(raw[:n])
            # Empty: nothing at all (offset 0); else the fixed part after the tag is short.
            assert info.value.offset == (0 if n == 0 else 1), (n, decode)
    for decode in (decode_message, decode_streamed):
        with pytest.raises(ProtocolError, match="trailing") as info:
            decode(raw + b"\x00")
        assert info.value.offset == len(raw)


def test_stream_start_first_segment_byte_must_be_0_or_1() -> None:
    assert decode_message(b"S" + struct.pack("!IB", 7, 0)) == StreamStart(7, False)
    assert decode_message(b"S" + struct.pack("!IB", 7, 1)) == StreamStart(7, True)
    for bad in (2, 0x54, 0xFF):
        with pytest.raises(ProtocolError, match="first-segment") as info:
            decode_message(b"S" + struct.pack("!IB", 7, bad))
        assert info.value.offset == 5


def test_stream_commit_and_abort_fields() -> None:
    raw = b"c" + struct.pack("!IBQQq", 0xFFFFFFFF, 0, 2**64 - 2, 2**64 - 1, -5)
    assert decode_message(raw) == StreamCommit(0xFFFFFFFF, 0, Lsn(2**64 - 2), Lsn(2**64 - 1), -5)
    assert decode_message(b"A" + struct.pack("!II", 10, 12)) == StreamAbort(10, 12)


def _tuple_fields(buf: bytes, pos: int) -> tuple[list[tuple[int, int]], int]:
    """(end, reported offset) of each field of a TupleData at `pos`, independently parsed."""
    fields = [(pos + 2, pos)]  # column count
    (ncols,) = struct.unpack_from("!h", buf, pos)
    pos += 2
    for _ in range(ncols):
        kind = buf[pos]
        fields.append((pos + 1, pos))  # kind byte
        if kind in b"tb":
            (length,) = struct.unpack_from("!i", buf, pos + 1)
            fields.append((pos + 5 + length, pos + 1))  # length and value
            pos += 5 + length
        else:
            pos += 1
    return fields, pos


def row_fields(buf: bytes, streamed: bool) -> list[tuple[int, int]]:
    """The fields of an Insert/Update/Delete as (end, offset an error about them names)."""
    start = 5 if streamed else 1
    fields = [(5, 1)] if streamed else []  # xid
    fields.append((start + 5, start))  # relation oid and marker
    pos = start + 5
    marker = buf[start + 4]
    tuple_fields, pos = _tuple_fields(buf, pos)
    fields += tuple_fields
    if buf[0] == ord("U") and marker != ord("N"):
        fields.append((pos + 1, pos))  # 'N' before the new tuple
        more, pos = _tuple_fields(buf, pos + 1)
        fields += more
    assert pos == len(buf)
    return fields


def expected_offset(fields: list[tuple[int, int]], n: int) -> int:
    """The offset of the first field the first `n` bytes do not hold whole."""
    return next(offset for end, offset in fields if end > n)


def streamed_rows() -> list[Decoded]:
    rows = [first_of(Insert, streamed=True), first_of(Delete, streamed=True)]
    rows.append(next(d for d in CAPTURE if isinstance(d.msg, Update) and d.block is not None
                     and d.msg.old_kind is OldTupleKind.KEY))
    rows.append(first_of(Update, step="D"))
    return rows


@pytest.mark.parametrize("d", streamed_rows(),
                         ids=lambda d: f"{type(d.msg).__name__}-{d.step}")
def test_every_truncation_of_a_streamed_row(d: Decoded) -> None:
    raw = d.raw
    fields = row_fields(raw, streamed=True)
    decoders: list[Callable[[bytes], object]] = [
        decode_streamed, lambda b: decode_row(b, streamed=True)]
    for n in range(1, len(raw)):
        expected = expected_offset(fields, n)
        for decode in decoders:
            with pytest.raises(ProtocolError) as info:
                decode(raw[:n])
            assert info.value.offset == expected, (n, decode)
    for decode in decoders:
        with pytest.raises(ProtocolError, match="trailing") as info:
            decode(raw + b"t")
        assert info.value.offset == len(raw)


@pytest.mark.parametrize("d", streamed_rows(),
                         ids=lambda d: f"{type(d.msg).__name__}-{d.step}")
def test_the_same_row_unstreamed_reports_offsets_4_bytes_earlier(d: Decoded) -> None:
    raw = d.raw[:1] + d.raw[5:]
    assert decode_message(raw) == d.msg
    fields = row_fields(raw, streamed=False)
    for n in range(1, len(raw)):
        for decode in (decode_message, decode_row):
            with pytest.raises(ProtocolError) as info:
                decode(raw[:n])
            assert info.value.offset == expected_offset(fields, n)


def test_other_streamed_messages_report_offsets_counting_the_xid() -> None:
    others = [d for d in CAPTURE if d.block is not None and d.xid is not None
              and d.raw[0] not in ROW_TAGS]
    assert {type(d.msg) for d in others} == {Relation, Message, Truncate}
    for d in others:
        plain = d.raw[:1] + d.raw[5:]
        assert decode_message(plain) == d.msg
        for n in range(1, len(d.raw)):
            with pytest.raises(ProtocolError) as info:
                decode_streamed(d.raw[:n])
            if n < 5:
                assert info.value.offset == 1
            else:
                with pytest.raises(ProtocolError) as plain_info:
                    decode_message(plain[:n - 4])
                assert plain_info.value.offset > 0
                assert info.value.offset == plain_info.value.offset + 4
        with pytest.raises(ProtocolError, match="trailing") as info:
            decode_streamed(d.raw + b"\x00")
        assert info.value.offset == len(d.raw)


def test_bad_markers_in_streamed_rows_name_the_marker_offset() -> None:
    insert = first_of(Insert, streamed=True).raw
    delete = first_of(Delete, streamed=True).raw
    for raw, bad in ((insert, b"K"), (delete, b"N"), (delete, b"X")):
        broken = raw[:9] + bad + raw[10:]
        for decode in (decode_streamed, lambda b: decode_row(b, streamed=True)):
            with pytest.raises(ProtocolError, match="expected") as info:
                decode(broken)
            assert info.value.offset == 9
    # An Update with an old key: its new tuple's 'N' comes after the old tuple.
    update = next(d.raw for d in CAPTURE if isinstance(d.msg, Update) and d.block is not None
                  and d.msg.old_kind is OldTupleKind.KEY)
    assert update[9] == ord("K")
    _, at = _tuple_fields(update, 10)
    assert update[at] == ord("N")
    for bad in (b"K", b"O", b"X"):
        broken = update[:at] + bad + update[at + 1:]
        for decode in (decode_streamed, lambda b: decode_row(b, streamed=True)):
            with pytest.raises(ProtocolError, match="expected 'N'") as info:
                decode(broken)
            assert info.value.offset == at
        with pytest.raises(ProtocolError, match="expected 'N'") as info:
            decode_row(broken[:1] + broken[5:])
        assert info.value.offset == at - 4


@pytest.mark.parametrize("tag, name", [(b"b", "Begin Prepare"), (b"P", "Prepare"),
                                       (b"K", "Commit Prepared"), (b"r", "Rollback Prepared"),
                                       (b"p", "Stream Prepare")])
def test_two_phase_messages_are_still_refused(tag: bytes, name: str) -> None:
    raw = tag + bytes(40)
    for decode in (decode_message, decode_streamed):
        with pytest.raises(ProtocolError, match=f"^{name} message .*protocol version 3") as info:
            decode(raw)
        assert info.value.offset == 0


def test_unknown_tag_inside_a_block() -> None:
    with pytest.raises(ProtocolError, match="unknown pgoutput message tag") as info:
        decode_streamed(b"Z\x00\x00\x00\x01")
    assert info.value.offset == 0

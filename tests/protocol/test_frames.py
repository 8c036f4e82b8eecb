"""Replication CopyData frames: captured XLogData and keepalives, and the standby status."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from cdc_sync.protocol import (
    Begin,
    Lsn,
    PrimaryKeepalive,
    ProtocolError,
    Relation,
    XLogData,
    datetime_to_pg_timestamp,
    decode_copy_data,
    decode_message,
    encode_standby_status,
)

from .payloads import FRAMES, STANDBY_STATUS, frames


def test_captured_xlogdata_frames() -> None:
    xlog = [f for f in FRAMES if f.raw[:1] == b"w"]
    assert len(xlog) > 50
    for frame in xlog:
        decoded = decode_copy_data(frame.raw)
        assert isinstance(decoded, XLogData)
        assert isinstance(decoded.wal_start, Lsn) and isinstance(decoded.wal_end, Lsn)
        assert type(decoded.data) is bytes
        assert decoded.data == frame.raw[25:]
        assert decoded.server_time > datetime_to_pg_timestamp(datetime(2020, 1, 1, tzinfo=UTC))
        decode_message(decoded.data)
        assert decode_copy_data(memoryview(frame.raw)) == decoded


def test_xlogdata_start_is_zero_for_relation_and_origin_begin() -> None:
    # ARCHITECTURE.md: take positions from Begin/Commit, not from the frame header.
    for frame in frames("text"):
        decoded = decode_copy_data(frame.raw)
        if isinstance(decoded, XLogData) and isinstance(decode_message(decoded.data), Relation):
            assert decoded.wal_start == 0
    (begin_frame,) = [f for f in frames("text", "origin") if f.note.startswith("w B")]
    decoded = decode_copy_data(begin_frame.raw)
    assert isinstance(decoded, XLogData) and decoded.wal_start == 0
    assert isinstance(decode_message(decoded.data), Begin)


def test_captured_keepalives() -> None:
    keepalives = [decode_copy_data(f.raw) for f in FRAMES if f.raw[:1] == b"k"]
    assert keepalives and all(isinstance(k, PrimaryKeepalive) for k in keepalives)
    flags = {k.reply_requested for k in keepalives if isinstance(k, PrimaryKeepalive)}
    assert flags == {True, False}
    for frame in FRAMES:
        if frame.raw[:1] == b"k":
            assert len(frame.raw) == 18


def test_keepalive_fields() -> None:
    frame = b"k" + struct.pack("!QqB", 0x1_0000_0002, 12345, 1)
    assert decode_copy_data(frame) == PrimaryKeepalive(Lsn(0x1_0000_0002), 12345, True)


def test_xlogdata_fields() -> None:
    frame = b"w" + struct.pack("!QQq", 1, 2, -3) + b"payload"
    decoded = decode_copy_data(frame)
    expected = XLogData(Lsn(1), Lsn(2), -3, b"payload")
    assert decoded == expected and hash(decoded) == hash(expected)
    assert repr(decoded) == repr(expected) == (
        "XLogData(wal_start=Lsn('0/1'), wal_end=Lsn('0/2'), server_time=-3, data=b'payload')"
    )
    with pytest.raises(AttributeError):
        decoded.data = b""  # type: ignore[misc]
    assert decode_copy_data(frame[:25]) == XLogData(Lsn(1), Lsn(2), -3, b"")


def test_every_truncation_raises() -> None:
    samples = [f.raw for f in FRAMES if f.raw[:1] == b"k"][:1]
    samples += [f.raw for f in FRAMES if f.raw[:1] == b"w"][:1]
    for raw in samples:
        for cut in range(18 if raw[:1] == b"k" else 25):
            with pytest.raises(ProtocolError) as info:
                decode_copy_data(raw[:cut])
            assert info.value.offset <= max(cut, 1)


@pytest.mark.parametrize(
    ("frame", "match", "offset"),
    [
        (b"", "empty", 0),
        (b"r" + bytes(33), "unknown replication CopyData tag b'r'", 0),
        (b"d" + bytes(30), "unknown replication CopyData tag", 0),
        (b"w" + bytes(10), "XLogData: header needs 24", 1),
        (b"k" + bytes(16), "keepalive: needs 17", 1),
        (b"k" + bytes(17) + b"\x00", "trailing", 18),
        (b"k" + bytes(16) + b"\x02", "reply-requested byte is 2", 17),
    ],
)
def test_malformed_frames(frame: bytes, match: str, offset: int) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_copy_data(frame)
    assert info.value.offset == offset


def test_encode_standby_status_layout() -> None:
    raw = encode_standby_status(Lsn(1), Lsn(2), Lsn(3), 4, reply=True)
    assert raw == b"r" + struct.pack("!QQQqB", 1, 2, 3, 4, 1)
    assert len(raw) == 34
    assert encode_standby_status(Lsn(1), Lsn(2), Lsn(3), 4)[-1] == 0
    top = Lsn(2**64 - 1)
    assert encode_standby_status(top, top, top, -1)[1:9] == b"\xff" * 8


def test_standby_status_was_accepted_by_the_server() -> None:
    # capture_payloads.py sent this encoder's output; the slot then confirmed that flush LSN.
    sent = bytes.fromhex(STANDBY_STATUS["sent_hex"])
    tag, write, flush, apply, _clock, reply = struct.unpack("!cQQQqB", sent)
    assert (tag, reply) == (b"r", 1)
    assert write == flush == apply == Lsn.parse(STANDBY_STATUS["flush"])
    assert STANDBY_STATUS["confirmed_flush_lsn"] == STANDBY_STATUS["flush"]
    assert encode_standby_status(Lsn(write), Lsn(flush), Lsn(apply), _clock, True) == sent

"""Streaming-replication CopyData frames: XLogData and keepalive in, standby status out.

Contract: `decode_copy_data(buf)` takes the payload of one CopyData message of a
`START_REPLICATION … LOGICAL` stream (what `pgconn.get_copy_data()` returns) and returns an
`XLogData` ('w') or a `PrimaryKeepalive` ('k'); anything else, a short frame or bytes after a
keepalive raise `ProtocolError` with the offset from the tag byte. `encode_standby_status`
builds the 'r' reply the client sends back. Layouts: PostgreSQL docs, "Streaming Replication
Protocol", and `src/backend/replication/walsender.c` (`WalSndPrepareWrite`, `WalSndKeepalive`,
`ProcessStandbyReplyMessage`). Times are microseconds since 2000-01-01 UTC, as on the wire.

An XLogData's `wal_start` is 0 for some pgoutput messages (Relation; a Begin followed by an
Origin): positions come from Begin/Commit, not from this header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Final

from ._errors import ProtocolError
from ._lsn import Lsn

__all__ = ["PrimaryKeepalive", "XLogData", "decode_copy_data", "encode_standby_status"]

_XLOG_HEADER: Final = struct.Struct("!QQq")  # wal_start, wal_end, server_time
_KEEPALIVE: Final = struct.Struct("!QqB")  # wal_end, server_time, reply_requested
_STANDBY_STATUS: Final = struct.Struct("!cQQQqB")  # 'r', write, flush, apply, clock, reply

XLOG_DATA_HEADER_SIZE: Final = 1 + _XLOG_HEADER.size
"""Bytes in front of the pgoutput message in an XLogData frame (25)."""

# Every row arrives in an XLogData frame, so building one is on the hot path: an unsigned
# 64-bit read is always in Lsn's range, so `int.__new__` skips `Lsn.__new__`'s check.
_new_int = int.__new__


@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': WAL data; `data` is one pgoutput message for `decode_message`."""

    wal_start: Lsn
    wal_end: Lsn
    server_time: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """'k': the server's current WAL end; `reply_requested` asks for a standby status now."""

    wal_end: Lsn
    server_time: int
    reply_requested: bool


# Like the per-row messages in `_decode`: fill the slots instead of the frozen `__init__`'s one
# `object.__setattr__` per field (a test compares the result with the dataclass constructor).
if tuple(f.name for f in fields(XLogData)) != ("wal_start", "wal_end", "server_time", "data"):
    raise RuntimeError("_frames._new_xlog_data no longer matches XLogData")
_new_object = object.__new__
_set_wal_start = XLogData.__dict__["wal_start"].__set__
_set_wal_end = XLogData.__dict__["wal_end"].__set__
_set_server_time = XLogData.__dict__["server_time"].__set__
_set_data = XLogData.__dict__["data"].__set__


def _new_xlog_data(wal_start: Lsn, wal_end: Lsn, server_time: int, data: bytes) -> XLogData:
    frame = _new_object(XLogData)
    _set_wal_start(frame, wal_start)
    _set_wal_end(frame, wal_end)
    _set_server_time(frame, server_time)
    _set_data(frame, data)
    return frame


def decode_copy_data(buf: bytes | memoryview) -> XLogData | PrimaryKeepalive:
    """Decode one CopyData payload of a replication stream."""
    if not buf:
        raise ProtocolError("empty CopyData frame", 0)
    tag = buf[0]
    if tag == 0x77:  # 'w'
        # XLogData: int64 start, int64 end, int64 send time, then the message.
        if len(buf) < XLOG_DATA_HEADER_SIZE:
            raise ProtocolError(
                f"XLogData: header needs {_XLOG_HEADER.size} byte(s), {len(buf) - 1} left", 1
            )
        wal_start, wal_end, server_time = _XLOG_HEADER.unpack_from(buf, 1)
        return _new_xlog_data(_new_int(Lsn, wal_start), _new_int(Lsn, wal_end), server_time,
                              bytes(buf[XLOG_DATA_HEADER_SIZE:]))
    if tag == 0x6B:  # 'k'
        # Primary keepalive: int64 WAL end, int64 send time, byte reply-requested (0 or 1).
        size = 1 + _KEEPALIVE.size
        if len(buf) < size:
            raise ProtocolError(
                f"keepalive: needs {_KEEPALIVE.size} byte(s), {len(buf) - 1} left", 1
            )
        if len(buf) > size:
            raise ProtocolError(f"{len(buf) - size} trailing byte(s) after keepalive", size)
        wal_end, server_time, reply = _KEEPALIVE.unpack_from(buf, 1)
        if reply > 1:
            raise ProtocolError(f"keepalive: reply-requested byte is {reply}, not 0 or 1",
                                size - 1)
        return PrimaryKeepalive(_new_int(Lsn, wal_end), server_time, bool(reply))
    raise ProtocolError(f"unknown replication CopyData tag {bytes((tag,))!r}", 0)


def encode_standby_status(
    write: Lsn, flush: Lsn, apply: Lsn, now: int, reply: bool = False
) -> bytes:
    """Build a Standby Status Update ('r'): positions written, flushed, applied; clock; reply.

    For a logical slot the server takes `flush` as the confirmed position (what it may recycle);
    `now` is microseconds since 2000-01-01 UTC; `reply` asks the server to answer at once.
    """
    return _STANDBY_STATUS.pack(b"r", write, flush, apply, now, 1 if reply else 0)

"""Decode one pgoutput message: `decode_message(buf) -> PgOutputMessage`, and inside a block
of streamed changes `decode_streamed(buf) -> (xid, PgOutputMessage)`.

Contract: `buf` is exactly one message, the payload of one XLogData frame, starting with its tag
byte. The result is a frozen dataclass from `_messages`; nothing is read from anywhere else.
Every read checks the remaining length. An unknown tag, a short read, a bad kind/marker byte, a
negative length, invalid UTF-8 or bytes left over after the message raise `ProtocolError` whose
offset is counted from the tag byte (offset 0).

The layout mirrors PostgreSQL's `src/backend/replication/logical/proto.c` (one `_decode_x` per
`logicalrep_read_x`, fields in the same order). Protocol versions 1 and 2 (`streaming 'on'`):
Stream Start/Stop/Commit/Abort are decoded by `decode_message`; between a Stream Start and its
Stream Stop the server puts the (sub)transaction's xid in front of Relation, Type, Insert,
Update, Delete, Truncate and Message, which `decode_streamed` reads (it returns xid None for the
messages that carry none there, such as Origin and Stream Stop). Two-phase messages (protocol 3)
are refused by name. Integers are network byte order; oids and LSNs are unsigned, timestamps and
type modifiers signed.

Speed matters: a transaction of a million rows is decoded here. `decode_row`, the per-row hot
path, runs the optional C decoder `_speedups.read_row` (built at install when a compiler is
there, see `hatch_build.py`) for well-formed rows: 0.4-0.7 us per 4-column Update against
3.4-3.9 us in Python, measured on this project's 2-CPU machine. It returns None for anything
else, and the Python code below, the reference, decodes it and raises the ProtocolError; tests
compare the two on captured, generated and corrupted messages. In Python (CPython 3.11: 0.42-0.47
million 5-column text Updates a second, about 2.2 us each; 3.0 us with the frame header),
`_read_tuple` is the hot loop: one call per tuple, not per column; one
precompiled `struct` read per column for kind and length (over a zero-padded copy of the
message, one copy per tuple); bound methods in locals; kind bytes compared as int literals.
Insert, Update and Delete are built by `_new_insert`/`_new_update`/`_new_delete`, which fill
the slots directly instead of going through the frozen dataclass `__init__` (one
`object.__setattr__` call per field).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields
from typing import Final

from ._errors import ProtocolError
from ._lsn import Lsn
from ._messages import (
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    OldTupleKind,
    Origin,
    PgOutputMessage,
    Relation,
    ReplicaIdentity,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
    Value,
)

__all__ = ["ROW_TAGS", "RowData", "decode_message", "decode_row", "decode_streamed"]

_BEGIN: Final = struct.Struct("!QqI")  # final_lsn, commit ts, xid
_COMMIT: Final = struct.Struct("!BQQq")  # flags, commit lsn, end lsn, commit ts
_LSN: Final = struct.Struct("!Q")
_OID: Final = struct.Struct("!I")
_OID_ACTION: Final = struct.Struct("!IB")  # relation oid, 'N'/'K'/'O' marker
_INT16: Final = struct.Struct("!h")
_ATTR_TYPE: Final = struct.Struct("!Ii")  # type oid, atttypmod
_TRUNCATE: Final = struct.Struct("!iB")  # nrelids, options
_MESSAGE: Final = struct.Struct("!BQ")  # flags, lsn
_INT32: Final = struct.Struct("!i")
# Kind byte and value length in one read. The length is read unsigned: a negative int32
# becomes >= 2**31 and fails the one "past the end" comparison of the hot loop; the error path
# tells the cases apart.
_KIND_LEN: Final = struct.Struct("!BI")
_PAD: Final = bytes(_KIND_LEN.size)
_NEGATIVE: Final = 0x8000_0000

_N: Final = 0x4E  # 'N' new tuple
_K: Final = 0x4B  # 'K' old key
_O: Final = 0x4F  # 'O' old row
# The tuple loop compares kind bytes with int literals ('t' 0x74, 'n' 0x6E, 'u' 0x75, 'b' 0x62):
# constants would cost a global lookup per column.

# An LSN read as unsigned 64 bits is always in range: `_new_int(Lsn, x)` skips Lsn's check.
_new_int = int.__new__

_REPLICA_IDENTITY: Final = {ord(r.value): r for r in ReplicaIdentity}

_STREAM_START: Final = struct.Struct("!IB")  # xid, first segment
_STREAM_COMMIT: Final = struct.Struct("!IBQQq")  # xid, flags, commit lsn, end lsn, commit ts
_STREAM_ABORT: Final = struct.Struct("!II")  # xid, subxid
_XID: Final = struct.Struct("!I")

# Tags of two-phase messages (protocol 3): named in the error, not decoded.
_UNSUPPORTED: Final = {
    ord("b"): "Begin Prepare",
    ord("P"): "Prepare",
    ord("K"): "Commit Prepared",
    ord("r"): "Rollback Prepared",
    ord("p"): "Stream Prepare",
}


def decode_message(buf: bytes | memoryview) -> PgOutputMessage:
    """Decode one pgoutput message; raise `ProtocolError` unless `buf` is exactly one message."""
    if type(buf) is not bytes:
        # One copy of a memoryview: bytes index and slice faster than a view for the hot loop.
        buf = bytes(buf)
    if not buf:
        raise ProtocolError("empty pgoutput message", 0)
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        name = _UNSUPPORTED.get(buf[0])
        if name is not None:
            raise ProtocolError(f"{name} message ({chr(buf[0])!r}) needs protocol version 3 "
                                "(two-phase), which cdc_sync does not request", 0)
        raise ProtocolError(f"unknown pgoutput message tag {buf[:1]!r}", 0)
    msg, pos = decoder(buf)
    if pos != len(buf):
        raise ProtocolError(f"{len(buf) - pos} trailing byte(s) after {type(msg).__name__}", pos)
    return msg


# Tags that carry the (sub)transaction's xid inside a block of streamed changes.
_XID_TAGS: Final = frozenset(b"RYIUDTM")


def decode_streamed(buf: bytes | memoryview) -> tuple[int | None, PgOutputMessage]:
    """Decode one message inside a block of streamed changes (between Stream Start and Stop).

    Returns the xid the server put in front of the message (that of the subtransaction that
    made a change), or None for messages without one there (Origin, Stream Stop). Error
    offsets count from the tag byte of `buf`, as for `decode_message`.
    """
    if type(buf) is not bytes:
        buf = bytes(buf)
    if not buf or buf[0] not in _XID_TAGS:
        return None, decode_message(buf)
    if len(buf) < 1 + _XID.size:
        raise _short("streamed transaction xid", 1, _XID.size, buf)
    (xid,) = _XID.unpack_from(buf, 1)
    try:
        return xid, decode_message(buf[:1] + buf[1 + _XID.size:])
    except ProtocolError as exc:
        # Offsets past the tag are 4 bytes further in the original message.
        offset = exc.offset + _XID.size if exc.offset > 0 else exc.offset
        raise ProtocolError(exc.reason, offset) from None


# The hot path: row changes without the message object (`decode_row`).
ROW_TAGS: Final = frozenset(b"IUD")
RowData = tuple[int | None, int, int, int, "TupleData | None", "TupleData | None"]
"""`decode_row`'s result: (xid or None, tag, relation oid, old-tuple marker ('N' none, 'K' key,
'O' old row), old tuple or None, new tuple or None (Delete))."""


def _load_speedups() -> Callable[[bytes, bool, object], RowData | None] | None:
    """`_speedups.read_row`, the C decoder, when it was built at install (`hatch_build.py`)."""
    try:
        from ._speedups import read_row
    except ImportError:
        return None
    return read_row


# Same results as `_read_row_py` for well-formed rows, None for anything else (then the Python
# path below decodes it and raises the right ProtocolError): about 8x faster.
_fast_row = _load_speedups()


def decode_row(buf: bytes, streamed: bool = False) -> RowData:
    """Decode an Insert, Update or Delete (tag in `ROW_TAGS`) straight into a plain tuple.

    The same checks and errors as `decode_message` (offsets from the tag byte); with
    `streamed`, the message comes from a block of streamed changes and carries an xid.
    """
    if _fast_row is not None:
        row = _fast_row(buf, streamed, UNCHANGED_TOAST)
        if row is not None:
            return row
    return _read_row_py(buf, streamed)


def _read_row_py(buf: bytes, streamed: bool) -> RowData:
    """`decode_row` in Python: the reference, and the one that explains errors."""
    xid: int | None = None
    start = 1
    if streamed:
        if len(buf) < 5:
            raise _short("streamed transaction xid", 1, 4, buf)
        (xid,) = _XID.unpack_from(buf, 1)
        start = 5
    tag, oid, action, old, new, pos = _read_row(buf, start)
    if pos != len(buf):
        raise ProtocolError(f"{len(buf) - pos} trailing byte(s) after {_ROW_NAMES[tag]}", pos)
    return xid, tag, oid, action, old, new


_ROW_NAMES: Final = {0x49: "Insert", 0x55: "Update", 0x44: "Delete"}


def _read_row(buf: bytes, start: int
              ) -> tuple[int, int, int, TupleData | None, TupleData | None, int]:
    """`logicalrep_read_insert/update/delete` from `start` (after the tag and any xid): (tag,
    relation oid, old-tuple marker, old tuple, new tuple, offset after the message)."""
    if not buf:
        raise ProtocolError("empty pgoutput message", 0)
    tag = buf[0]
    name = _ROW_NAMES.get(tag)
    if name is None:
        raise ProtocolError(f"not a row change: tag {buf[:1]!r}", 0)
    if len(buf) < start + 5:
        raise _short(name, start, 5, buf)
    oid, action = _OID_ACTION.unpack_from(buf, start)
    old: TupleData | None = None
    new: TupleData | None = None
    if tag == 0x55:  # 'U': optional 'K' or 'O' + TupleData, then 'N' + TupleData
        if action == _N:
            new, pos = _read_tuple(buf, start + 5)
        else:
            _old_kind(action, start + 4, "Update")
            old, pos = _read_tuple(buf, start + 5)
            if pos >= len(buf):
                raise _short("Update new-tuple marker", pos, 1, buf)
            if buf[pos] != _N:
                raise ProtocolError(f"Update: expected 'N', got {buf[pos:pos + 1]!r}", pos)
            new, pos = _read_tuple(buf, pos + 1)
    elif tag == 0x49:  # 'I': 'N' + TupleData
        if action != _N:
            raise ProtocolError(f"Insert: expected 'N', got {bytes((action,))!r}", start + 4)
        new, pos = _read_tuple(buf, start + 5)
    else:  # 'D': 'K' or 'O' + TupleData
        _old_kind(action, start + 4, "Delete")
        old, pos = _read_tuple(buf, start + 5)
    return tag, oid, action, old, new, pos


# --- shared readers ----------------------------------------------------------------------------


def _short(what: str, pos: int, need: int, buf: bytes) -> ProtocolError:
    have = max(len(buf) - pos, 0)
    return ProtocolError(f"{what}: needs {need} byte(s), {have} left", pos)


def _read_cstring(buf: bytes, pos: int, what: str) -> tuple[str, int]:
    """`pq_getmsgstring`: a NUL-terminated UTF-8 string; returns it and the offset after the NUL."""
    try:
        nul = buf.index(0, pos)
    except ValueError:
        raise ProtocolError(f"{what}: no NUL terminator", pos) from None
    try:
        return buf[pos:nul].decode(), nul + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: invalid UTF-8", pos + exc.start) from None


def _read_tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """`logicalrep_read_tuple`: int16 column count, then per column a kind byte and its value.

    'n' NULL -> None, 'u' unchanged TOAST -> UNCHANGED_TOAST, 't' int32 length + text -> str,
    'b' int32 length + bytes -> bytes. Returns the values and the offset after the tuple.
    """
    end = len(buf)
    if pos + 2 > end:
        raise _short("TupleData column count", pos, 2, buf)
    (ncols,) = _INT16.unpack_from(buf, pos)
    if ncols < 0:
        raise ProtocolError(f"TupleData: negative column count {ncols}", pos)
    pos += 2
    # One unpack reads the kind byte and the int32 that follows a 't'/'b'. Zero padding keeps
    # that read in range for an 'n'/'u' in the last bytes and for a missing kind byte (read as
    # 0 at `end`); `pos` never passes `end`, every length is checked against the real `end`.
    padded = buf + _PAD
    unpack = _KIND_LEN.unpack_from
    values: list[Value] = []
    append = values.append
    try:
        for _ in range(ncols):
            kind, length = unpack(padded, pos)
            if kind == 0x74:  # 't': the usual case first
                pos += 5
                stop = pos + length
                if stop > end:
                    raise _bad_length(length, pos - 4, buf)
                append(buf[pos:stop].decode())
                pos = stop
            elif kind == 0x6E:  # 'n'
                append(None)
                pos += 1
            elif kind == 0x75:  # 'u'
                append(UNCHANGED_TOAST)
                pos += 1
            elif kind == 0x62:  # 'b'
                pos += 5
                stop = pos + length
                if stop > end:
                    raise _bad_length(length, pos - 4, buf)
                append(buf[pos:stop])
                pos = stop
            elif pos >= end:
                raise _short("TupleData column kind", pos, 1, buf)
            else:
                raise ProtocolError(f"TupleData: unknown column kind {bytes((kind,))!r}", pos)
    except UnicodeDecodeError as exc:
        raise ProtocolError("TupleData: text value is not valid UTF-8", pos + exc.start) from None
    return tuple(values), pos


def _bad_length(length: int, pos: int, buf: bytes) -> ProtocolError:
    """The error for a value length at `pos` that does not fit (read unsigned, from padding)."""
    if pos + 4 > len(buf):
        return _short("TupleData value length", pos, 4, buf)
    if length >= _NEGATIVE:
        return ProtocolError(f"TupleData: negative value length {length - (1 << 32)}", pos)
    return ProtocolError(
        f"TupleData: value of {length} byte(s) runs past the end ({len(buf) - pos - 4} left)",
        pos,
    )


def _old_kind(marker: int, pos: int, what: str) -> OldTupleKind:
    if marker == _K:
        return OldTupleKind.KEY
    if marker == _O:
        return OldTupleKind.OLD
    raise ProtocolError(f"{what}: expected 'K' or 'O', got {bytes((marker,))!r}", pos)


# --- slot-filling constructors for the per-row messages ------------------------------------------
# A frozen dataclass's generated __init__ sets each field through object.__setattr__; setting the
# slot descriptors directly builds an equal object in under half the time. Only valid while the
# classes have exactly these fields and no __post_init__: `_check_fast_constructors` verifies
# that at import, and a test compares the results with the normal constructors.

_FAST_FIELDS: Final = {
    Insert: ("relation_oid", "new"),
    Update: ("relation_oid", "old_kind", "old", "new"),
    Delete: ("relation_oid", "old_kind", "old"),
}


def _check_fast_constructors() -> None:
    for cls, names in _FAST_FIELDS.items():
        if tuple(f.name for f in fields(cls)) != names or hasattr(cls, "__post_init__"):
            raise RuntimeError(f"_decode's fast constructor no longer matches {cls.__name__}")


_check_fast_constructors()
_new_object = object.__new__
_set_insert_oid = Insert.__dict__["relation_oid"].__set__
_set_insert_new = Insert.__dict__["new"].__set__
_set_update_oid = Update.__dict__["relation_oid"].__set__
_set_update_old_kind = Update.__dict__["old_kind"].__set__
_set_update_old = Update.__dict__["old"].__set__
_set_update_new = Update.__dict__["new"].__set__
_set_delete_oid = Delete.__dict__["relation_oid"].__set__
_set_delete_old_kind = Delete.__dict__["old_kind"].__set__
_set_delete_old = Delete.__dict__["old"].__set__


def _new_insert(relation_oid: int, new: TupleData) -> Insert:
    msg = _new_object(Insert)
    _set_insert_oid(msg, relation_oid)
    _set_insert_new(msg, new)
    return msg


def _new_update(
    relation_oid: int, old_kind: OldTupleKind | None, old: TupleData | None, new: TupleData
) -> Update:
    msg = _new_object(Update)
    _set_update_oid(msg, relation_oid)
    _set_update_old_kind(msg, old_kind)
    _set_update_old(msg, old)
    _set_update_new(msg, new)
    return msg


def _new_delete(relation_oid: int, old_kind: OldTupleKind, old: TupleData) -> Delete:
    msg = _new_object(Delete)
    _set_delete_oid(msg, relation_oid)
    _set_delete_old_kind(msg, old_kind)
    _set_delete_old(msg, old)
    return msg


# --- one decoder per message, in proto.c order ---------------------------------------------------


def _decode_begin(buf: bytes) -> tuple[Begin, int]:
    # logicalrep_read_begin: final_lsn int64, commit timestamp int64, xid int32
    if len(buf) < 1 + _BEGIN.size:
        raise _short("Begin", 1, _BEGIN.size, buf)
    final_lsn, commit_ts, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(_new_int(Lsn, final_lsn), commit_ts, xid), 1 + _BEGIN.size


def _decode_commit(buf: bytes) -> tuple[Commit, int]:
    # logicalrep_read_commit: flags int8 (0 so far), commit lsn, end lsn, commit timestamp.
    # proto.c rejects non-zero flags; they are kept here for the caller to judge.
    if len(buf) < 1 + _COMMIT.size:
        raise _short("Commit", 1, _COMMIT.size, buf)
    flags, commit_lsn, end_lsn, commit_ts = _COMMIT.unpack_from(buf, 1)
    commit = Commit(flags, _new_int(Lsn, commit_lsn), _new_int(Lsn, end_lsn), commit_ts)
    return commit, 1 + _COMMIT.size


def _decode_origin(buf: bytes) -> tuple[Origin, int]:
    # logicalrep_read_origin: origin lsn int64, origin name cstring
    if len(buf) < 1 + _LSN.size:
        raise _short("Origin LSN", 1, _LSN.size, buf)
    (origin_lsn,) = _LSN.unpack_from(buf, 1)
    name, pos = _read_cstring(buf, 1 + _LSN.size, "Origin name")
    return Origin(_new_int(Lsn, origin_lsn), name), pos


def _decode_insert(buf: bytes) -> tuple[Insert, int]:
    # logicalrep_read_insert: relation oid int32, 'N', TupleData (see _read_row)
    _tag, oid, _action, _old, new, pos = _read_row(buf, 1)
    assert new is not None
    return _new_insert(oid, new), pos


def _decode_update(buf: bytes) -> tuple[Update, int]:
    # logicalrep_read_update: relation oid, optional 'K' or 'O' + TupleData, 'N' + TupleData
    _tag, oid, action, old, new, pos = _read_row(buf, 1)
    assert new is not None
    old_kind = None if action == _N else _old_kind(action, 5, "Update")
    return _new_update(oid, old_kind, old, new), pos


def _decode_delete(buf: bytes) -> tuple[Delete, int]:
    # logicalrep_read_delete: relation oid, 'K' or 'O', TupleData
    _tag, oid, action, old, _new, pos = _read_row(buf, 1)
    assert old is not None
    return _new_delete(oid, _old_kind(action, 5, "Delete"), old), pos


def _decode_truncate(buf: bytes) -> tuple[Truncate, int]:
    # logicalrep_read_truncate: nrelids int32, options int8 (1 cascade, 2 restart), oids
    if len(buf) < 1 + _TRUNCATE.size:
        raise _short("Truncate", 1, _TRUNCATE.size, buf)
    nrelids, options = _TRUNCATE.unpack_from(buf, 1)
    if nrelids < 0:
        raise ProtocolError(f"Truncate: negative relation count {nrelids}", 1)
    pos = 1 + _TRUNCATE.size
    if len(buf) < pos + 4 * nrelids:
        raise _short("Truncate relation oids", pos, 4 * nrelids, buf)
    oids = struct.unpack_from(f"!{nrelids}I", buf, pos)
    return Truncate(options, oids), pos + 4 * nrelids


def _decode_message(buf: bytes) -> tuple[Message, int]:
    # logicalrep_write_message (proto.c has no reader): flags int8, lsn int64, prefix cstring,
    # content length int32, content bytes
    if len(buf) < 1 + _MESSAGE.size:
        raise _short("Message", 1, _MESSAGE.size, buf)
    flags, lsn = _MESSAGE.unpack_from(buf, 1)
    prefix, pos = _read_cstring(buf, 1 + _MESSAGE.size, "Message prefix")
    if len(buf) < pos + 4:
        raise _short("Message content length", pos, 4, buf)
    (length,) = _INT32.unpack_from(buf, pos)
    if length < 0:
        raise ProtocolError(f"Message: negative content length {length}", pos)
    pos += 4
    if len(buf) < pos + length:
        raise _short("Message content", pos, length, buf)
    return Message(flags, _new_int(Lsn, lsn), prefix, buf[pos:pos + length]), pos + length


def _decode_relation(buf: bytes) -> tuple[Relation, int]:
    # logicalrep_read_rel: oid, namespace cstring ('' = pg_catalog, kept as ''), relname cstring,
    # replica identity char, then logicalrep_read_attrs
    if len(buf) < 1 + _OID.size:
        raise _short("Relation oid", 1, _OID.size, buf)
    (oid,) = _OID.unpack_from(buf, 1)
    namespace, pos = _read_cstring(buf, 1 + _OID.size, "Relation namespace")
    name, pos = _read_cstring(buf, pos, "Relation name")
    if pos >= len(buf):
        raise _short("Relation replica identity", pos, 1, buf)
    replident = _REPLICA_IDENTITY.get(buf[pos])
    if replident is None:
        raise ProtocolError(f"Relation: unknown replica identity {buf[pos:pos + 1]!r}", pos)
    columns, pos = _read_attrs(buf, pos + 1)
    return Relation(oid, namespace, name, replident, columns), pos


def _read_attrs(buf: bytes, pos: int) -> tuple[tuple[Column, ...], int]:
    # logicalrep_read_attrs: natts int16, per column flags int8, name cstring, type oid, typmod
    if len(buf) < pos + 2:
        raise _short("Relation column count", pos, 2, buf)
    (natts,) = _INT16.unpack_from(buf, pos)
    if natts < 0:
        raise ProtocolError(f"Relation: negative column count {natts}", pos)
    pos += 2
    columns: list[Column] = []
    for _ in range(natts):
        if pos >= len(buf):
            raise _short("Relation column flags", pos, 1, buf)
        flags = buf[pos]
        name, pos = _read_cstring(buf, pos + 1, "Relation column name")
        if len(buf) < pos + _ATTR_TYPE.size:
            raise _short("Relation column type", pos, _ATTR_TYPE.size, buf)
        type_oid, type_modifier = _ATTR_TYPE.unpack_from(buf, pos)
        pos += _ATTR_TYPE.size
        columns.append(Column(flags, name, type_oid, type_modifier))
    return tuple(columns), pos


def _decode_type(buf: bytes) -> tuple[Type, int]:
    # logicalrep_read_typ: type oid, namespace cstring, type name cstring
    if len(buf) < 1 + _OID.size:
        raise _short("Type oid", 1, _OID.size, buf)
    (oid,) = _OID.unpack_from(buf, 1)
    namespace, pos = _read_cstring(buf, 1 + _OID.size, "Type namespace")
    name, pos = _read_cstring(buf, pos, "Type name")
    return Type(oid, namespace, name), pos


def _decode_stream_start(buf: bytes) -> tuple[StreamStart, int]:
    # logicalrep_read_stream_start: xid int32, first segment int8
    if len(buf) < 1 + _STREAM_START.size:
        raise _short("Stream Start", 1, _STREAM_START.size, buf)
    xid, first = _STREAM_START.unpack_from(buf, 1)
    if first not in (0, 1):
        raise ProtocolError(f"Stream Start: first-segment flag {first} is neither 0 nor 1", 5)
    return StreamStart(xid, bool(first)), 1 + _STREAM_START.size


def _decode_stream_stop(buf: bytes) -> tuple[StreamStop, int]:
    # logicalrep_write_stream_stop: the tag only
    return StreamStop(), 1


def _decode_stream_commit(buf: bytes) -> tuple[StreamCommit, int]:
    # logicalrep_read_stream_commit: xid, flags int8 (0), commit lsn, end lsn, commit timestamp
    if len(buf) < 1 + _STREAM_COMMIT.size:
        raise _short("Stream Commit", 1, _STREAM_COMMIT.size, buf)
    xid, flags, commit_lsn, end_lsn, commit_ts = _STREAM_COMMIT.unpack_from(buf, 1)
    return (StreamCommit(xid, flags, _new_int(Lsn, commit_lsn), _new_int(Lsn, end_lsn), commit_ts),
            1 + _STREAM_COMMIT.size)


def _decode_stream_abort(buf: bytes) -> tuple[StreamAbort, int]:
    # logicalrep_read_stream_abort: xid, subxid (protocol 4 adds abort lsn and time; we ask 2)
    if len(buf) < 1 + _STREAM_ABORT.size:
        raise _short("Stream Abort", 1, _STREAM_ABORT.size, buf)
    xid, subxid = _STREAM_ABORT.unpack_from(buf, 1)
    return StreamAbort(xid, subxid), 1 + _STREAM_ABORT.size


_DECODERS: Final[dict[int, Callable[[bytes], tuple[PgOutputMessage, int]]]] = {
    ord("I"): _decode_insert,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("R"): _decode_relation,
    ord("O"): _decode_origin,
    ord("Y"): _decode_type,
    ord("T"): _decode_truncate,
    ord("M"): _decode_message,
    ord("S"): _decode_stream_start,
    ord("E"): _decode_stream_stop,
    ord("c"): _decode_stream_commit,
    ord("A"): _decode_stream_abort,
}

"""The bus message format: source transactions as chunks of pgoutput messages. Stdlib only.

Contract:

- A bus message carries one chunk of one source transaction (or one non-transactional logical
  message): its body is `MAGIC` followed by pgoutput messages exactly as the WAL sender sent
  them (without the XLogData header), each prefixed by its length (4 bytes, big-endian). The
  appliers decode them with the same decoder as the in-process path: nothing is re-encoded.
- Chunks are self-contained for decoding: every Relation (and Type) message a chunk's rows
  refer to travels in the chunk, or in an earlier chunk of the same transaction.
- Chunking is deterministic: a chunk ends after `CHUNK_ROWS` data messages (insert, update,
  delete, truncate, logical message) or once their bytes reach `CHUNK_BYTES`, and at commit.
  Relation, Type and Origin messages do not count, as the WAL sender sends them again in every
  session. So a transaction decoded again after a crash is cut exactly as before, and its
  chunks get the same `Nats-Msg-Id`: `"<commit LSN>:<chunk number>"`.
- Headers (`HEADER_*`): the message id, the format version, the transaction's commit LSN (the
  Begin message's final LSN), the chunk number (0 first), "1" on the chunk holding the
  Commit, and on chunk 0 the end LSN of the transaction published before it in the same
  capture session (gap detection when the stream's retention discarded messages).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = ["BUS_MESSAGE_OP", "CHUNK_BYTES", "CHUNK_ROWS", "FORMAT_VERSION", "MAGIC",
           "BusFormatError", "Chunk", "Chunker", "decode_body", "encode_body", "msg_id"]

MAGIC: Final = b"CDC1"
FORMAT_VERSION: Final = "1"
BUS_MESSAGE_OP: Final = "bus_message"  # a site's dead letter for a stream message not ours
CHUNK_ROWS: Final = 2000
CHUNK_BYTES: Final = 512 * 1024

HEADER_ID: Final = "Nats-Msg-Id"
HEADER_FORMAT: Final = "Cdc-Format"
HEADER_TX: Final = "Cdc-Tx"
HEADER_CHUNK: Final = "Cdc-Chunk"
HEADER_LAST: Final = "Cdc-Last"
HEADER_PREV: Final = "Cdc-Prev"

_LEN = struct.Struct("!I")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_DATA_TAGS: Final = frozenset(b"IUDTM")  # count towards a chunk's size
_ROW_RELID_TAGS: Final = frozenset(b"IUD")


class BusFormatError(ValueError):
    """A bus message that is not ours, or of a newer format."""


def msg_id(commit_lsn: int, chunk: int) -> str:
    return f"{commit_lsn:X}:{chunk}"


def encode_body(frames: list[bytes]) -> bytes:
    parts = [MAGIC]
    for frame in frames:
        parts.append(_LEN.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def decode_body(body: bytes) -> Iterator[bytes]:
    """The pgoutput messages of a bus message body (`BusFormatError` if it is not one)."""
    if body[:4] != MAGIC:
        raise BusFormatError("not a cdc-sync bus message (bad magic)")
    view = memoryview(body)
    pos, end = 4, len(body)
    while pos < end:
        if pos + 4 > end:
            raise BusFormatError("truncated bus message")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise BusFormatError("truncated bus message")
        yield bytes(view[pos:pos + n])
        pos += n


@dataclass(slots=True)
class Chunk:
    """One bus message to publish."""

    commit_lsn: int
    number: int
    frames: list[bytes]
    last: bool
    prev_end: int | None = None  # chunk 0: end LSN of the previous published transaction
    end_lsn: int | None = None  # the last chunk: the transaction's end LSN (not published)

    @property
    def msg_id(self) -> str:
        return msg_id(self.commit_lsn, self.number)

    def headers(self) -> dict[str, str]:
        h = {HEADER_ID: self.msg_id, HEADER_FORMAT: FORMAT_VERSION,
             HEADER_TX: f"{self.commit_lsn:X}", HEADER_CHUNK: str(self.number)}
        if self.last:
            h[HEADER_LAST] = "1"
        if self.prev_end is not None:
            h[HEADER_PREV] = f"{self.prev_end:X}"
        return h

    def body(self) -> bytes:
        return encode_body(self.frames)


def _relids(frame: bytes) -> tuple[int, ...]:
    tag = frame[0]
    if tag in _ROW_RELID_TAGS:
        return (_U32.unpack_from(frame, 1)[0],)
    if tag == ord("T"):
        (n,) = _U32.unpack_from(frame, 1)
        return tuple(_U32.unpack_from(frame, 6 + 4 * i)[0] for i in range(n))
    return ()


class Chunker:
    """Cuts the pgoutput messages of a (non-streaming) replication session into `Chunk`s.

    `feed(frame)` returns the chunks completed by that message. Between transactions only
    non-transactional logical messages ('M') make chunks of their own; keepalives never reach
    here. A transaction carrying a replication origin is dropped when `drop_origins`
    (`skipped_end` is then its end LSN)."""

    def __init__(self, *, drop_origins: bool, chunk_rows: int = CHUNK_ROWS,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.drop_origins = drop_origins
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self._relations: dict[int, bytes] = {}
        self._types: dict[int, bytes] = {}
        self._in_tx = False
        self._dropping = False
        self._commit_lsn = 0
        self._number = 0
        self._frames: list[bytes] = []
        self._rows = 0
        self._bytes = 0
        self._included: set[int] = set()
        self.last_end: int | None = None  # end LSN of the last transaction chunked
        self.skipped_end: int | None = None

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def feed(self, frame: bytes) -> list[Chunk]:
        tag = frame[0]
        if tag == ord("B"):
            (self._commit_lsn,) = _U64.unpack_from(frame, 1)
            self._in_tx, self._dropping = True, False
            self._number, self._rows, self._bytes = 0, 0, 0
            self._included = set()
            self._frames = [*self._types.values(), frame]
            return []
        if tag == ord("R"):
            (relid,) = _U32.unpack_from(frame, 1)
            self._relations[relid] = frame
            if self._in_tx:
                self._frames.append(frame)
                self._included.add(relid)
            return []
        if tag == ord("Y"):
            (typid,) = _U32.unpack_from(frame, 1)
            self._types[typid] = frame
            if self._in_tx:
                self._frames.append(frame)
            return []
        if not self._in_tx:
            if tag == ord("M"):  # non-transactional logical message: flags, lsn, ...
                (lsn,) = _U64.unpack_from(frame, 2)
                return [Chunk(lsn, 0, [frame], True)]
            return []
        if tag == ord("O"):
            if self.drop_origins:
                self._dropping = True
            else:
                self._frames.append(frame)
            return []
        if tag == ord("C"):
            self._in_tx = False
            (end,) = _U64.unpack_from(frame, 10)
            if self._dropping:
                self.skipped_end = end
                self._frames = []
                return []
            self._frames.append(frame)
            chunk = self._cut(last=True)
            chunk.end_lsn = self.last_end = end
            return [chunk]
        if self._dropping:
            return []
        out: list[Chunk] = []
        if tag in _DATA_TAGS:
            if self._rows >= self.chunk_rows or (
                    self._rows and self._bytes + len(frame) > self.chunk_bytes):
                out.append(self._cut(last=False))
            for relid in _relids(frame):
                if relid not in self._included and relid in self._relations:
                    self._frames.append(self._relations[relid])
                    self._included.add(relid)
            self._rows += 1
            self._bytes += len(frame)
        self._frames.append(frame)
        return out

    def _cut(self, *, last: bool) -> Chunk:
        chunk = Chunk(self._commit_lsn, self._number, self._frames, last,
                      self.last_end if self._number == 0 else None)
        self._number += 1
        self._frames, self._rows, self._bytes = [], 0, 0
        return chunk

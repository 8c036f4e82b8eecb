"""The bus message format: source transactions as chunks of pgoutput messages. Stdlib only.

Contract:

- A bus message carries whole source transactions (a *pack*: consecutive small ones), or one
  chunk of one large transaction, or one non-transactional logical message. Its body is `MAGIC`
  followed by pgoutput messages exactly as the WAL sender sent them (without the XLogData
  header), each prefixed by its length (4 bytes, big-endian). The appliers decode them with the
  same decoder as the in-process path: nothing is re-encoded.
- Messages are self-contained for decoding: every Relation (and Type) message a message's rows
  refer to travels in it, or in an earlier chunk of the same transaction.
- A message holds at most `CHUNK_ROWS` data messages (insert, update, delete, truncate,
  logical message) or about `CHUNK_BYTES` of them. A transaction that outgrows that alone is
  cut into chunks by its own data messages only (Relation, Type and Origin messages do not
  count, as the WAL sender sends them again in every session), so a transaction decoded again
  after a crash is cut exactly as before: chunk `n` of a transaction is always the same rows.
  Where a pack ends depends on timing (capture sends what it has read whenever the source
  pauses), which is why capture never publishes again what the stream holds (`Resume`).
- Headers (`HEADER_*`): the message id (`Nats-Msg-Id`: "<commit LSN>:<chunk>", for a pack of
  several transactions "<first commit LSN>-<last commit LSN>"), the format version, the commit
  LSN (the Begin message's final LSN) of the first transaction, of the last one when they
  differ, the chunk number (0 first; a pack is chunk 0), "1" on the message holding the last
  Commit, and on chunk 0 the end LSN of the transaction published before it (gap detection when
  the stream's retention discarded messages). Messages are in commit order in the stream.
- Format "1" (one transaction per message) is still read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = ["BUS_MESSAGE_OP", "CHUNK_BYTES", "CHUNK_ROWS", "FORMAT_VERSION", "MAGIC",
           "READABLE_FORMATS", "BusFormatError", "Chunk", "Chunker", "Resume", "decode_body",
           "encode_body", "msg_id", "span_of"]

MAGIC: Final = b"CDC1"
FORMAT_VERSION: Final = "2"
READABLE_FORMATS: Final = frozenset({"1", "2"})
BUS_MESSAGE_OP: Final = "bus_message"  # a site's dead letter for a stream message not ours
CHUNK_ROWS: Final = 2000
CHUNK_BYTES: Final = 512 * 1024

HEADER_ID: Final = "Nats-Msg-Id"
HEADER_FORMAT: Final = "Cdc-Format"
HEADER_TX: Final = "Cdc-Tx"
HEADER_TX_LAST: Final = "Cdc-Tx-Last"
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


def msg_id(commit_lsn: int, chunk: int, last_commit: int | None = None) -> str:
    if last_commit is not None and last_commit != commit_lsn:
        return f"{commit_lsn:X}-{last_commit:X}"
    return f"{commit_lsn:X}:{chunk}"


def span_of(headers: dict[str, str] | None) -> tuple[int, int] | None:
    """(first, last) commit LSN of the transactions in a message; None if it is not ours."""
    if not headers or HEADER_TX not in headers:
        return None
    try:
        first = int(headers[HEADER_TX], 16)
        last = int(headers[HEADER_TX_LAST], 16) if HEADER_TX_LAST in headers else first
    except ValueError:
        return None
    return first, last


@dataclass(frozen=True, slots=True)
class Resume:
    """Where the stream ends: capture publishes only what follows (see `Chunker`)."""

    commit_lsn: int  # of the last transaction in the stream's last message
    chunk: int
    final: bool  # that message holds the transaction's Commit

    @classmethod
    def of(cls, headers: dict[str, str] | None) -> Resume | None:
        span = span_of(headers)
        if span is None or headers is None:
            return None
        try:
            chunk = int(headers.get(HEADER_CHUNK, "0"))
        except ValueError:
            return None
        return cls(span[1], chunk, headers.get(HEADER_LAST) == "1")


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

    commit_lsn: int  # of its (first) transaction
    number: int
    frames: list[bytes]
    last: bool
    prev_end: int | None = None  # chunk 0: end LSN of the previous published transaction
    end_lsn: int | None = None  # with `last`: its (last) transaction's end LSN (not published)
    last_commit: int | None = None  # a pack: commit LSN of its last transaction

    @property
    def msg_id(self) -> str:
        return msg_id(self.commit_lsn, self.number, self.last_commit)

    def headers(self) -> dict[str, str]:
        h = {HEADER_ID: self.msg_id, HEADER_FORMAT: FORMAT_VERSION,
             HEADER_TX: f"{self.commit_lsn:X}", HEADER_CHUNK: str(self.number)}
        if self.last_commit is not None and self.last_commit != self.commit_lsn:
            h[HEADER_TX_LAST] = f"{self.last_commit:X}"
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

    `feed(frame)` returns the messages completed by that pgoutput message: a pack once it is
    full, a large transaction's chunks as they fill. `flush()` returns the pack of the whole
    transactions read so far (capture calls it whenever it has read all the source sent).
    Between transactions only non-transactional logical messages ('M') make messages of their
    own; keepalives never reach here. A transaction carrying a replication origin is dropped
    when `drop_origins` (`skipped_end` is then its end LSN). With `resume` (the stream's last
    message), what the stream already holds is dropped the same way: transactions committed
    before it, and the chunks up to it of the one it ends inside."""

    def __init__(self, *, drop_origins: bool, chunk_rows: int = CHUNK_ROWS,
                 chunk_bytes: int = CHUNK_BYTES, resume: Resume | None = None) -> None:
        self.drop_origins = drop_origins
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.resume = resume
        self._relations: dict[int, bytes] = {}
        self._types: dict[int, bytes] = {}
        # The message being filled: the pack (whole transactions), then the open transaction's
        # frames from `_tx_at` on.
        self._frames: list[bytes] = []
        self._included: set[int] = set()  # relations whose message is in `_frames`
        self._pack_first: int | None = None
        self._pack_last = self._pack_end = 0
        self._pack_prev: int | None = None
        self._pack_rows = self._pack_bytes = 0
        # The open transaction.
        self._in_tx = False
        self._dropping = False
        self._held = False  # the transaction dropped is one the stream holds
        self._commit_lsn = 0
        self._number = 0  # its current chunk
        self._skip_chunks = -1  # resuming: its chunks up to this one are in the stream
        self._tx_at = 0
        self._tx_prev: int | None = None
        self._rows = self._bytes = 0  # of its current chunk
        self._own: set[int] = set()  # relations whose message is among its current chunk's
        self._needs: dict[int, bytes] = {}  # ... and those it takes from the pack before it
        self.last_end: int | None = None  # end LSN of the last transaction chunked
        self.skipped_end: int | None = None

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    @property
    def buffered(self) -> bool:
        """Whole transactions wait in the pack (`flush` sends them)."""
        return self._pack_first is not None

    def flush(self) -> list[Chunk]:
        return [self._cut_pack()] if self._pack_first is not None else []

    def feed(self, frame: bytes) -> list[Chunk]:
        tag = frame[0]
        if tag == ord("B"):
            return self._begin(frame)
        if tag == ord("R"):
            (relid,) = _U32.unpack_from(frame, 1)
            self._relations[relid] = frame
            if self._in_tx and not self._dropping:
                self._frames.append(frame)
                self._included.add(relid)
                self._own.add(relid)  # (a need noted before stays: earlier rows use that one)
            return []
        if tag == ord("Y"):
            (typid,) = _U32.unpack_from(frame, 1)
            self._types[typid] = frame
            if self._in_tx and not self._dropping:
                self._frames.append(frame)
            return []
        if not self._in_tx:
            if tag == ord("M"):  # non-transactional logical message: flags, lsn, ...
                (lsn,) = _U64.unpack_from(frame, 2)
                if self.resume is not None and lsn <= self.resume.commit_lsn:
                    return []
                self.resume = None
                return [*self.flush(), Chunk(lsn, 0, [frame], True)]
            return []
        if self._dropping:
            if tag == ord("C"):
                self._in_tx = False
                (self.skipped_end,) = _U64.unpack_from(frame, 10)
                if self._held:  # in the stream: what follows it is published after it
                    self.last_end = self.skipped_end
            return []
        if tag == ord("O"):
            if self.drop_origins:
                self._drop()
            else:
                self._frames.append(frame)
            return []
        if tag == ord("C"):
            return self._commit(frame)
        out: list[Chunk] = []
        if tag in _DATA_TAGS:
            size = len(frame)
            if self._rows >= self.chunk_rows or (
                    self._rows and self._bytes + size > self.chunk_bytes):
                out.extend(self._cut_open())  # the transaction outgrew a message
            elif self._pack_first is not None and (
                    self._pack_rows + self._rows >= self.chunk_rows
                    or self._pack_bytes + self._bytes + size > self.chunk_bytes):
                out.append(self._cut_pack())  # the message is full: the pack goes first
            for relid in _relids(frame):
                if relid in self._own or relid not in self._relations:
                    continue
                if relid in self._included:  # sent with a transaction before, in the pack
                    self._needs.setdefault(relid, self._relations[relid])
                else:
                    self._frames.append(self._relations[relid])
                    self._included.add(relid)
                    self._own.add(relid)
            self._rows += 1
            self._bytes += size
        self._frames.append(frame)
        return out

    def _begin(self, frame: bytes) -> list[Chunk]:
        (commit,) = _U64.unpack_from(frame, 1)
        self._in_tx, self._dropping, self._held = True, False, False
        self._commit_lsn, self._number, self._skip_chunks = commit, 0, -1
        self._rows = self._bytes = 0
        self._own, self._needs = set(), {}
        self._tx_prev = self.last_end
        self._tx_at = len(self._frames)
        resume = self.resume
        if resume is not None:
            if commit < resume.commit_lsn or (commit == resume.commit_lsn and resume.final):
                self._dropping = self._held = True  # the stream holds it
                return []
            if commit == resume.commit_lsn:
                self._skip_chunks = resume.chunk  # the stream holds its chunks up to there
            self.resume = None
        if not self._frames:
            self._frames.extend(self._types.values())
        self._frames.append(frame)
        return []

    def _drop(self) -> None:
        """Forget the open transaction (it began the message's frames from `_tx_at`)."""
        del self._frames[self._tx_at:]
        self._included -= self._own
        self._dropping = True

    def _commit(self, frame: bytes) -> list[Chunk]:
        self._in_tx = False
        (end,) = _U64.unpack_from(frame, 10)
        self._frames.append(frame)
        self.last_end = end
        if self._number == 0:  # whole in this message: it joins the pack
            if self._pack_first is None:
                self._pack_first, self._pack_prev = self._commit_lsn, self._tx_prev
            self._pack_last, self._pack_end = self._commit_lsn, end
            self._pack_rows += self._rows
            self._pack_bytes += self._bytes
            self._tx_at = len(self._frames)
            if self._pack_rows >= self.chunk_rows or self._pack_bytes >= self.chunk_bytes:
                return [self._cut_pack()]
            return []
        chunk = self._chunk(last=True)
        chunk.end_lsn = end
        self._reset_message()
        return [] if chunk.number <= self._skip_chunks else [chunk]

    def _chunk(self, *, last: bool) -> Chunk:
        return Chunk(self._commit_lsn, self._number, self._frames, last,
                     self._tx_prev if self._number == 0 else None)

    def _cut_open(self) -> list[Chunk]:
        """End the open transaction's current chunk (the pack before it goes first)."""
        out = [self._cut_pack()] if self._pack_first is not None else []
        chunk = self._chunk(last=False)
        self._number += 1
        self._reset_message()
        self._own, self._needs = set(), {}
        self._rows = self._bytes = 0
        if chunk.number > self._skip_chunks:
            out.append(chunk)
        return out

    def _cut_pack(self) -> Chunk:
        """The pack as a message; the open transaction's frames begin the next one."""
        assert self._pack_first is not None
        frames, rest = self._frames[:self._tx_at], self._frames[self._tx_at:]
        chunk = Chunk(self._pack_first, 0, frames, True, self._pack_prev, self._pack_end,
                      self._pack_last)
        self._pack_first, self._pack_prev = None, None
        self._pack_rows = self._pack_bytes = 0
        self._reset_message()
        if rest:  # [Begin, (Origin), ...]: the relations it took from the pack come along
            at = 2 if len(rest) > 1 and rest[1][:1] == b"O" else 1
            rest[at:at] = self._needs.values()
            self._frames = [*self._types.values(), *rest]
            self._own.update(self._needs)
            self._included = set(self._own)
            self._needs = {}
        return chunk

    def _reset_message(self) -> None:
        self._frames, self._included, self._tx_at = [], set(), 0

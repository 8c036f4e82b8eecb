"""The one event model: `Table`, `Change`, and transactions as a stream of items.

A source transaction reaches the sinks as `TxBegin`, one or more `TxChanges` chunks (at most
`chunk_size` changes each, so a huge transaction never sits in memory whole), then `TxCommit`.
Items are immutable and shared by every site: decode once, fan out.

A large transaction the server streams while it is still in progress (protocol 2, `streaming
'on'`) arrives instead as `TxStreamChanges` chunks (each tagged with its top-level `xid` and the
`subxid` of the subtransaction that made its changes), interleaved with whole transactions, and
ends with `TxStreamCommit` or `TxStreamAbort` (an abort with `subxid != xid` undoes only that
subtransaction's changes).

`Assembler` turns decoded pgoutput messages into those items. Values stay in PostgreSQL's text
form (`str`), `None` for NULL and `UNCHANGED_TOAST` for unchanged TOASTed values.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from .protocol import (
    UNCHANGED_TOAST,
    Begin,
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
    TupleData,
    Type,
    Update,
    decode_message,
    decode_row,
    pg_timestamp_to_datetime,
)

__all__ = [
    "UNCHANGED_TOAST",
    "Assembler",
    "Change",
    "Op",
    "Table",
    "Transaction",
    "TxBegin",
    "TxChanges",
    "TxCommit",
    "TxItem",
    "TxStreamAbort",
    "TxStreamChanges",
    "TxStreamCommit",
    "collect_transactions",
]

DEFAULT_CHUNK_SIZE = 5000
# Chunks are also cut at about this many bytes of encoded rows, so a queue of chunks stays
# small whatever the row width (5000 rows of 2 kB would be 10 MB a chunk).
DEFAULT_CHUNK_BYTES = 1 << 20


class Op(enum.Enum):
    """What a change does; the values are the `op` strings of the event JSON."""

    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"
    MESSAGE = "message"


@dataclass(frozen=True, slots=True)
class Table:
    """A source table as the stream describes it (only published, non-generated columns)."""

    oid: int
    schema: str
    name: str
    columns: tuple[str, ...]
    type_oids: tuple[int, ...]
    type_modifiers: tuple[int, ...]
    key: tuple[int, ...]
    replica_identity: ReplicaIdentity

    @property
    def qualified(self) -> str:
        """`schema.table`, unquoted: the event `topic` and config-pattern form."""
        return f"{self.schema}.{self.name}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(self.columns[i] for i in self.key)

    @classmethod
    def from_relation(cls, rel: Relation) -> Table:
        return cls(
            oid=rel.oid,
            schema=rel.namespace or "pg_catalog",
            name=rel.name,
            columns=tuple(c.name for c in rel.columns),
            type_oids=tuple(c.type_oid for c in rel.columns),
            type_modifiers=tuple(c.type_modifier for c in rel.columns),
            key=tuple(i for i, c in enumerate(rel.columns) if c.is_key),
            replica_identity=rel.replica_identity,
        )


class Change(NamedTuple):
    """One row change, truncate or emitted message, at `position` within its transaction.

    insert: `new`. update: `new`, and `old` when the server sent one (`old_is_key`: only the
    replica-identity columns are meaningful, others are None). delete: `old`. truncate:
    `truncated` tables and `truncate_options`. message: `prefix` and `content`.

    A NamedTuple rather than a frozen dataclass: one is built per row change on the hot path,
    and tuple construction is several times cheaper than a frozen dataclass's `__init__`.
    """

    op: Op
    position: int
    table: Table | None = None
    new: TupleData | None = None
    old: TupleData | None = None
    old_is_key: bool = False
    truncated: tuple[Table, ...] = ()
    truncate_options: int = 0
    prefix: str = ""
    content: bytes = b""


_OP_OF_TAG: dict[int, Op] = {ord("I"): Op.INSERT, ord("U"): Op.UPDATE, ord("D"): Op.DELETE}
_K = ord("K")
_new_tuple = tuple.__new__


@dataclass(frozen=True, slots=True)
class TxBegin:
    """A source transaction starts. `commit_lsn` is known up front (pgoutput's final LSN)."""

    xid: int
    commit_lsn: Lsn
    commit_ts: datetime
    origin: str | None


@dataclass(frozen=True, slots=True)
class TxChanges:
    """A chunk of the changes of the open transaction, in source order."""

    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class TxCommit:
    """The open transaction ends; `end_lsn` is what a site records as applied."""

    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class TxStreamChanges:
    """A chunk of changes of the in-progress transaction `xid`, all made by its (sub)transaction
    `subxid` (`== xid` at the top level), in source order. `first` marks the transaction's
    first chunk of the stream session."""

    xid: int
    subxid: int
    changes: tuple[Change, ...]
    first: bool = False


@dataclass(frozen=True, slots=True)
class TxStreamCommit:
    """The streamed transaction `xid` committed; `end_lsn` is what a site records as applied;
    `origin` the replication origin its stream named, if any."""

    xid: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: datetime
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class TxStreamAbort:
    """The streamed transaction `xid` rolled back (`subxid == xid`), or only its subtransaction
    `subxid`, with every change that subtransaction (and those under it) streamed."""

    xid: int
    subxid: int


TxItem = TxBegin | TxChanges | TxCommit | TxStreamChanges | TxStreamCommit | TxStreamAbort


@dataclass(frozen=True, slots=True)
class Transaction:
    """A whole transaction: for tests and small consumers (see `collect_transactions`)."""

    begin: TxBegin
    changes: tuple[Change, ...]
    commit: TxCommit


@dataclass(slots=True)
class Assembler:
    """Turns pgoutput messages into `TxItem`s; keeps the relation map of the session.

    Feed every decoded message to `feed`, which returns the items it completes. Raises
    `ProtocolError` on messages out of order (a change outside a transaction, a nested Begin).
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    tables: dict[int, Table] = field(default_factory=dict)
    types: dict[int, Type] = field(default_factory=dict)
    _begin: Begin | None = None
    _origin: str | None = None
    _begun: bool = False
    _position: int = 0
    _pending: list[Change] = field(default_factory=list)
    _pending_bytes: int = 0
    # streaming (protocol 2): the block being read, and per open streamed transaction its
    # next change position and origin
    _block_xid: int | None = None
    _block_sub: int = 0
    _unmarked: set[int] = field(default_factory=set)  # streamed xids without a chunk yet
    _stream_pos: dict[int, int] = field(default_factory=dict)
    stream_origins: dict[int, str] = field(default_factory=dict)

    @property
    def in_transaction(self) -> bool:
        return self._begin is not None

    @property
    def in_stream_block(self) -> bool:
        """Between a Stream Start and its Stream Stop: decode with `decode_streamed`."""
        return self._block_xid is not None

    @property
    def open_streams(self) -> int:
        """Streamed transactions begun and not yet committed or aborted."""
        return len(self._stream_pos)

    def reset(self) -> None:
        """Forget an open transaction (after a lost connection); relations are re-sent anyway."""
        self._begin = None
        self._origin = None
        self._begun = False
        self._pending = []
        self._pending_bytes = 0
        self._block_xid = None
        self._unmarked.clear()
        self._stream_pos.clear()
        self.stream_origins.clear()
        self.tables.clear()

    def _relation(self, msg: Relation) -> None:
        # An unchanged Relation keeps its Table object: the sites cache their description of a
        # table by that object, and the bus repeats every Relation in every message.
        table = Table.from_relation(msg)
        if self.tables.get(msg.oid) != table:
            self.tables[msg.oid] = table

    def feed(self, msg: PgOutputMessage, size: int = 0) -> list[TxItem]:
        """Take one message (`size`: its encoded length, bounding chunks by bytes too)."""
        cls = type(msg)
        if (cls is Update or cls is Insert or cls is Delete) and self._begun:
            # The hot path: a row change inside an already announced transaction.
            self._pending.append(self._change(msg))
            self._position += 1
            self._pending_bytes += size
            if len(self._pending) >= self.chunk_size or self._pending_bytes >= self.chunk_bytes:
                return [self._chunk()]
            return []
        out: list[TxItem] = []
        if isinstance(msg, Begin):
            if self._begin is not None:
                raise ProtocolError("Begin inside an open transaction", 0)
            self._begin, self._origin, self._begun, self._position = msg, None, False, 0
            return out
        if isinstance(msg, Relation):
            self._relation(msg)
            return out
        if isinstance(msg, Type):
            self.types[msg.oid] = msg
            return out
        if isinstance(msg, Origin):
            self._origin = msg.name
            return out
        if isinstance(msg, (StreamStart, StreamCommit, StreamAbort)):
            return self._stream_control(msg)
        if isinstance(msg, Message) and not msg.transactional and self._begin is None:
            # A non-transactional message arrives on its own: a one-change pseudo transaction.
            ts = pg_timestamp_to_datetime(0)
            change = Change(Op.MESSAGE, 0, prefix=msg.prefix, content=msg.content)
            return [
                TxBegin(0, msg.lsn, ts, None),
                TxChanges((change,)),
                TxCommit(msg.lsn, msg.lsn, ts),
            ]
        begin = self._begin
        if begin is None:
            raise ProtocolError(f"{type(msg).__name__} outside a transaction", 0)
        if not self._begun:
            out.append(self._announce())
        if isinstance(msg, Commit):
            if self._pending:
                out.append(self._chunk())
            out.append(TxCommit(msg.commit_lsn, msg.end_lsn,
                                pg_timestamp_to_datetime(msg.commit_ts)))
            self._begin = None
            self._begun = False
            return out
        self._pending.append(self._change(msg))
        self._position += 1
        self._pending_bytes += size
        if len(self._pending) >= self.chunk_size or self._pending_bytes >= self.chunk_bytes:
            out.append(self._chunk())
        return out

    def feed_row(self, data: bytes) -> list[TxItem]:
        """The hot path: the payload of an Insert, Update or Delete (`ROW_TAGS`), inside a
        transaction or a block of streamed changes; the same as decoding it and `feed`ing it,
        without the message object in between."""
        top = self._block_xid
        out: list[TxItem] = []
        if top is None and not self._begun:
            if self._begin is None:
                return self.feed(decode_message(data), len(data))  # the error for it
            out.append(self._announce())
        xid, tag, oid, action, old, new = decode_row(data, top is not None)
        if top is not None:
            pos = self._streamed_position(top, xid, out)
        else:
            pos = self._position
            self._position = pos + 1
        table = self.tables.get(oid)
        if table is None:
            raise ProtocolError(f"change for relation {oid} before its Relation message", 0)
        pending = self._pending
        # Change(op, position, table, new, old, old_is_key) with the other fields' defaults,
        # built as a plain tuple (NamedTuple's __new__ is a Python function).
        pending.append(_new_tuple(Change, (_OP_OF_TAG[tag], pos, table, new, old, action == _K,
                                           (), 0, "", b"")))
        self._pending_bytes += len(data)
        if len(pending) >= self.chunk_size or self._pending_bytes >= self.chunk_bytes:
            out.append(self._stream_chunk() if top is not None else self._chunk())
        return out

    def _announce(self) -> TxBegin:
        """The open transaction's `TxBegin`, sent before its first change (or its commit)."""
        begin = self._begin
        assert begin is not None
        self._begun = True
        return TxBegin(begin.xid, begin.final_lsn, pg_timestamp_to_datetime(begin.commit_ts),
                       self._origin)

    def _chunk(self) -> TxChanges:
        chunk = TxChanges(tuple(self._pending))
        self._pending, self._pending_bytes = [], 0
        return chunk

    # -- streamed transactions (protocol 2) -----------------------------------------------
    def _stream_control(self, msg: StreamStart | StreamCommit | StreamAbort) -> list[TxItem]:
        if self._begin is not None:
            raise ProtocolError(f"{type(msg).__name__} inside an open transaction", 0)
        if isinstance(msg, StreamStart):
            if msg.first_segment:
                self._stream_pos[msg.xid] = 0
                self.stream_origins.pop(msg.xid, None)
                self._unmarked.add(msg.xid)
            elif msg.xid not in self._stream_pos:
                # A later block of a transaction whose start we never saw cannot be applied.
                raise ProtocolError(f"Stream Start of transaction {msg.xid} without its "
                                    "first segment", 0)
            self._block_xid, self._block_sub = msg.xid, msg.xid
            self._pending, self._pending_bytes = [], 0
            return []
        pos = self._stream_pos.pop(msg.xid, None)
        known = pos is not None
        if not (isinstance(msg, StreamAbort) and msg.subxid != msg.xid):
            self._unmarked.discard(msg.xid)
        if isinstance(msg, StreamCommit):
            if not known:
                return []
            origin = self.stream_origins.pop(msg.xid, None)
            return [TxStreamCommit(msg.xid, msg.commit_lsn, msg.end_lsn,
                                   pg_timestamp_to_datetime(msg.commit_ts), origin)]
        if msg.subxid != msg.xid and pos is not None:
            self._stream_pos[msg.xid] = pos  # still open: only a subtransaction rolled back
        elif known:
            self.stream_origins.pop(msg.xid, None)
        return [TxStreamAbort(msg.xid, msg.subxid)] if known else []

    def feed_streamed(self, xid: int | None, msg: PgOutputMessage, size: int = 0) -> list[TxItem]:
        """Take one message inside a block of streamed changes (`decode_streamed`'s result)."""
        top = self._block_xid
        if top is None:
            raise ProtocolError(f"streamed {type(msg).__name__} outside a Stream Start/Stop block",
                                0)
        cls = type(msg)
        out: list[TxItem] = []
        if cls is Update or cls is Insert or cls is Delete or cls is Truncate or cls is Message:
            self._position = self._streamed_position(top, xid, out)  # what _change reads
            self._pending.append(self._change(msg))
            self._pending_bytes += size
            if len(self._pending) >= self.chunk_size or self._pending_bytes >= self.chunk_bytes:
                out.append(self._stream_chunk())
            return out
        if isinstance(msg, StreamStop):
            if self._pending:
                out.append(self._stream_chunk())
            self._block_xid = None
            return out
        if isinstance(msg, Relation):
            self._relation(msg)
        elif isinstance(msg, Type):
            self.types[msg.oid] = msg
        elif isinstance(msg, Origin):
            self.stream_origins[top] = msg.name
        else:
            raise ProtocolError(f"unexpected {cls.__name__} inside a block of streamed changes", 0)
        return out

    def _streamed_position(self, top: int, xid: int | None, out: list[TxItem]) -> int:
        """The position of the next change of streamed transaction `top`, made by (sub)
        transaction `xid` (None: the top level); a change of another subtransaction than the
        pending ones first cuts their chunk (into `out`)."""
        sub = top if xid is None else xid
        if sub != self._block_sub and self._pending:
            out.append(self._stream_chunk())
        self._block_sub = sub
        pos = self._stream_pos.get(top, 0)
        self._stream_pos[top] = pos + 1
        return pos

    def _stream_chunk(self) -> TxStreamChanges:
        assert self._block_xid is not None
        xid = self._block_xid
        first = xid in self._unmarked
        if first:
            self._unmarked.discard(xid)
        chunk = TxStreamChanges(xid, self._block_sub, tuple(self._pending), first)
        self._pending, self._pending_bytes = [], 0
        return chunk

    def _table(self, oid: int) -> Table:
        try:
            return self.tables[oid]
        except KeyError:
            raise ProtocolError(f"change for relation {oid} before its Relation message",
                                0) from None

    def _change(self, msg: PgOutputMessage) -> Change:
        pos = self._position
        if type(msg) is Update:
            return Change(Op.UPDATE, pos, self._table(msg.relation_oid), msg.new, msg.old,
                          msg.old_kind is OldTupleKind.KEY)
        if isinstance(msg, Insert):
            return Change(Op.INSERT, pos, self._table(msg.relation_oid), new=msg.new)
        if isinstance(msg, Update):
            return Change(Op.UPDATE, pos, self._table(msg.relation_oid), new=msg.new, old=msg.old,
                          old_is_key=msg.old_kind is OldTupleKind.KEY)
        if isinstance(msg, Delete):
            return Change(Op.DELETE, pos, self._table(msg.relation_oid), old=msg.old,
                          old_is_key=msg.old_kind is OldTupleKind.KEY)
        if isinstance(msg, Truncate):
            tables = tuple(self._table(oid) for oid in msg.relation_oids)
            return Change(Op.TRUNCATE, pos, truncated=tables, truncate_options=msg.options)
        if isinstance(msg, Message):
            return Change(Op.MESSAGE, pos, prefix=msg.prefix, content=msg.content)
        raise ProtocolError(f"unexpected {type(msg).__name__} inside a transaction", 0)


def collect_transactions(items: list[TxItem] | Iterator[TxItem]) -> list[Transaction]:
    """Gather a finite item stream into whole `Transaction`s (tests, small tools)."""
    result: list[Transaction] = []
    begin: TxBegin | None = None
    changes: list[Change] = []
    for item in items:
        if isinstance(item, TxBegin):
            begin, changes = item, []
        elif isinstance(item, TxChanges):
            changes.extend(item.changes)
        elif isinstance(item, TxCommit) and begin is not None:
            result.append(Transaction(begin, tuple(changes), item))
            begin = None
    return result

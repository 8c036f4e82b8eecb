"""pgoutput messages (protocol 1, plus protocol 2's streaming of in-progress transactions) as
frozen, slotted dataclasses.

Field order follows PostgreSQL's `src/backend/replication/logical/proto.c`
(`logicalrep_write_*`). Timestamps are kept as microseconds since 2000-01-01 UTC (PostgreSQL's
epoch), exactly as on the wire; `_time.pg_timestamp_to_datetime` converts at the edges.

Tuple values: `None` for `n` (NULL), `UNCHANGED_TOAST` for `u` (an unchanged TOASTed value the
server did not send), `str` for `t` (text form, decoded as UTF-8), `bytes` for `b` (binary).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ._lsn import Lsn


class MessageKind(enum.Enum):
    """The first byte of a pgoutput message."""

    BEGIN = b"B"
    COMMIT = b"C"
    ORIGIN = b"O"
    RELATION = b"R"
    TYPE = b"Y"
    INSERT = b"I"
    UPDATE = b"U"
    DELETE = b"D"
    TRUNCATE = b"T"
    MESSAGE = b"M"
    STREAM_START = b"S"
    STREAM_STOP = b"E"
    STREAM_COMMIT = b"c"
    STREAM_ABORT = b"A"


class TupleKind(enum.Enum):
    """The kind byte in front of each column of TupleData."""

    NULL = b"n"
    UNCHANGED_TOAST = b"u"
    TEXT = b"t"
    BINARY = b"b"


class _UnchangedToast:
    """Singleton marking a TOASTed column value the server did not send (kind `u`)."""

    __slots__ = ()
    _instance: _UnchangedToast | None = None

    def __new__(cls) -> _UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = _UnchangedToast()

Value = str | bytes | None | _UnchangedToast
TupleData = tuple[Value, ...]


class ReplicaIdentity(enum.Enum):
    """`relreplident` as sent in the Relation message."""

    DEFAULT = "d"
    NOTHING = "n"
    FULL = "f"
    INDEX = "i"


class OldTupleKind(enum.Enum):
    """What an Update or Delete carries as the old row: the key only, or the whole row."""

    KEY = b"K"
    OLD = b"O"


@dataclass(frozen=True, slots=True)
class Begin:
    """`logicalrep_write_begin`: final (commit) LSN, commit timestamp, xid."""

    final_lsn: Lsn
    commit_ts: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """`logicalrep_write_commit`: flags (unused, 0), commit LSN, end LSN, commit timestamp."""

    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: int


@dataclass(frozen=True, slots=True)
class Origin:
    """`logicalrep_write_origin`: the origin's commit LSN and name."""

    origin_lsn: Lsn
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a Relation message. `flags & 1` marks a replica-identity (key) column."""

    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """`logicalrep_write_rel`: oid, namespace ('' = pg_catalog), name, replica identity, columns."""

    oid: int
    namespace: str
    name: str
    replica_identity: ReplicaIdentity
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """`logicalrep_write_typ`: a non-builtin type's oid, namespace and name."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """`logicalrep_write_insert`: relation oid and the new row (after the `N` marker)."""

    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """`logicalrep_write_update`: relation oid, optional old key (`K`) or old row (`O`), new row."""

    relation_oid: int
    old_kind: OldTupleKind | None
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """`logicalrep_write_delete`: relation oid and the old key (`K`) or old row (`O`)."""

    relation_oid: int
    old_kind: OldTupleKind
    old: TupleData


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(frozen=True, slots=True)
class Truncate:
    """`logicalrep_write_truncate`: option bits (1 cascade, 2 restart identity), relation oids."""

    options: int
    relation_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """`logicalrep_write_message`: flags (1 = transactional), LSN, prefix, content bytes."""

    flags: int
    lsn: Lsn
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class StreamStart:
    """`logicalrep_write_stream_start` (protocol 2): a block of changes of the in-progress
    transaction `xid` follows, up to `StreamStop`; `first_segment` marks its first block."""

    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """`logicalrep_write_stream_stop`: the current block of streamed changes ends."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    """`logicalrep_write_stream_commit`: the streamed transaction `xid` committed."""

    xid: int
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """`logicalrep_write_stream_abort`: the streamed transaction `xid` (when `subxid == xid`)
    or only its subtransaction `subxid` (with everything it streamed) rolled back."""

    xid: int
    subxid: int


PgOutputMessage = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
    | StreamStart | StreamStop | StreamCommit | StreamAbort
)

"""pgoutput and replication-protocol codecs: bytes in, frozen dataclasses out. No I/O.

This package imports only the standard library (a test enforces it).
"""

from ._decode import decode_message
from ._errors import ProtocolError
from ._frames import (
    PrimaryKeepalive,
    XLogData,
    decode_copy_data,
    encode_standby_status,
)
from ._lsn import INVALID_LSN, Lsn
from ._messages import (
    PG_EPOCH,
    TRUNCATE_CASCADE,
    TRUNCATE_RESTART_IDENTITY,
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    MessageKind,
    OldTupleKind,
    Origin,
    PgOutputMessage,
    Relation,
    ReplicaIdentity,
    Truncate,
    TupleData,
    TupleKind,
    Type,
    Update,
    Value,
    datetime_to_pg_timestamp,
    pg_timestamp_to_datetime,
)

__all__ = [
    "INVALID_LSN",
    "PG_EPOCH",
    "TRUNCATE_CASCADE",
    "TRUNCATE_RESTART_IDENTITY",
    "UNCHANGED_TOAST",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "Lsn",
    "Message",
    "MessageKind",
    "OldTupleKind",
    "Origin",
    "PgOutputMessage",
    "PrimaryKeepalive",
    "ProtocolError",
    "Relation",
    "ReplicaIdentity",
    "Truncate",
    "TupleData",
    "TupleKind",
    "Type",
    "Update",
    "Value",
    "XLogData",
    "datetime_to_pg_timestamp",
    "decode_copy_data",
    "decode_message",
    "encode_standby_status",
    "pg_timestamp_to_datetime",
]

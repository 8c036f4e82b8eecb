"""pgoutput and replication-protocol codecs: bytes in, frozen dataclasses out. No I/O.

This package imports only the standard library (a test enforces it).

Its submodules are loaded on first use of one of their names (PEP 562 `__getattr__`): a
command that only needs `Lsn` or `ProtocolError` (`init`, `status`) does not pay for building
the message classes and the decoder's tables at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import ProtocolError
from ._lsn import INVALID_LSN, Lsn

if TYPE_CHECKING:
    from ._decode import ROW_TAGS, RowData, decode_message, decode_row, decode_streamed
    from ._frames import (
        XLOG_DATA_HEADER_SIZE,
        PrimaryKeepalive,
        XLogData,
        decode_copy_data,
        encode_standby_status,
    )
    from ._messages import (
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
        StreamAbort,
        StreamCommit,
        StreamStart,
        StreamStop,
        Truncate,
        TupleData,
        TupleKind,
        Type,
        Update,
        Value,
    )
    from ._time import PG_EPOCH, datetime_to_pg_timestamp, pg_timestamp_to_datetime

# Where `__getattr__` looks for an exported name, cheapest module first (`_decode` builds the
# decoder's tables and loads `_messages` itself).
_SUBMODULES = ("_time", "_frames", "_messages", "_decode")
_MISSING = object()


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _SUBMODULES:
            value = getattr(importlib.import_module(f".{module}", __name__), name, _MISSING)
            if value is not _MISSING:
                globals()[name] = value  # once loaded, a plain module attribute
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ROW_TAGS",
    "RowData",
    "INVALID_LSN",
    "PG_EPOCH",
    "TRUNCATE_CASCADE",
    "TRUNCATE_RESTART_IDENTITY",
    "UNCHANGED_TOAST",
    "XLOG_DATA_HEADER_SIZE",
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
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
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
    "decode_row",
    "decode_streamed",
    "encode_standby_status",
    "pg_timestamp_to_datetime",
]

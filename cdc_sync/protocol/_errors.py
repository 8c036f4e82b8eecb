"""`ProtocolError`: malformed replication or pgoutput bytes, with the offset where it was found."""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes that do not form a valid message: unknown tag, short read, trailing bytes."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte offset {offset})")
        self.reason = message
        self.offset = offset

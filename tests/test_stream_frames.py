"""`ReplicationStream.decode_frame`: a malformed CopyData payload is a lost stream (the
pipeline reconnects), not a crash; a good one decodes."""

from __future__ import annotations

import struct

import pytest

from cdc_sync.protocol import PrimaryKeepalive, XLogData
from cdc_sync.source.stream import ReplicationStream, StreamLost


def test_keepalive_and_xlogdata_decode() -> None:
    keepalive = ReplicationStream.decode_frame(b"k" + struct.pack("!QqB", 42, 7, 1))
    assert keepalive == PrimaryKeepalive(42, 7, True)  # type: ignore[arg-type]
    frame = ReplicationStream.decode_frame(b"w" + struct.pack("!QQq", 1, 2, 3) + b"B")
    assert isinstance(frame, XLogData) and frame.data == b"B"


@pytest.mark.parametrize("data", [b"k" + bytes(5), b"w" + bytes(10), b"?" + bytes(30)])
def test_malformed_frames_are_a_lost_stream(data: bytes) -> None:
    with pytest.raises(StreamLost, match="malformed replication data"):
        ReplicationStream.decode_frame(data)

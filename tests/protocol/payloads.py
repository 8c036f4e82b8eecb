"""Frames captured from a real PostgreSQL 15 (`captured.json`, written by `capture_payloads.py`).

`frames(session, step)` gives the CopyData frames of one step of the capture ("text" session:
proto_version 1 with messages; "binary" session: the same plus `binary 'true'`);
`payloads(...)` the pgoutput messages inside their XLogData frames. Steps and their SQL are in
`STEPS` (the JSON's "steps"), in capture order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdc_sync.protocol import XLogData, decode_copy_data

_DOC: dict[str, Any] = json.loads(Path(__file__).with_name("captured.json").read_text())

SERVER_VERSION: str = _DOC["server_version"]
STEPS: dict[str, dict[str, str]] = _DOC["steps"]
STANDBY_STATUS: dict[str, str] = _DOC["standby_status"]

# The TOASTed value of items.big: SELECT string_agg(md5(i::text), '') FROM generate_series(1, 100)
BIG_VALUE = "".join(hashlib.md5(str(i).encode()).hexdigest() for i in range(1, 101))
ORIGIN_NAME = "cdc_capture_o1"
SCHEMA = "cdc_capture"


@dataclass(frozen=True)
class Frame:
    session: str
    step: str
    note: str
    raw: bytes


FRAMES: tuple[Frame, ...] = tuple(
    Frame(f["session"], f["step"], f["note"], bytes.fromhex(f["hex"])) for f in _DOC["frames"]
)


def frames(session: str = "text", step: str | None = None) -> list[Frame]:
    """The captured frames of `session`, all or those of one step, in stream order."""
    return [f for f in FRAMES if f.session == session and (step is None or f.step == step)]


def payloads(session: str = "text", step: str | None = None) -> list[bytes]:
    """The pgoutput messages (XLogData payloads) of `session`, all or one step's."""
    out = []
    for frame in frames(session, step):
        decoded = decode_copy_data(frame.raw)
        if isinstance(decoded, XLogData):
            out.append(decoded.data)
    return out

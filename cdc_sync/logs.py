"""Logging set-up: human lines by default, one JSON object per line with `--log-format json`.

Every record passes through `mask_dsn`, so no password reaches a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from .errors import mask_dsn


class _HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_dsn(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_dsn(record.getMessage()),
        }
        if record.exc_info:
            data["exc"] = mask_dsn(self.formatException(record.exc_info))
        return json.dumps(data)


def setup_logging(level: str = "INFO", fmt: str = "human") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_HumanFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # alembic narrates every migration step at INFO; keep that for --log-level DEBUG.
    logging.getLogger("alembic").setLevel(
        logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)

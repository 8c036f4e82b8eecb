"""`stream_apply_possible`: in-progress transactions are streamed and applied as they arrive
only when asked for and when nothing needs a transaction's commit time or position first."""

from __future__ import annotations

from typing import Any

import pytest

from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.pipeline import stream_apply_possible

SOURCE: dict[str, Any] = {"name": "washington", "dsn": "dbname=src"}
SITES: list[dict[str, Any]] = [{"name": "berlin", "dsn": "dbname=berlin"},
                               {"name": "paris", "dsn": "dbname=paris"}]
WEBHOOK: dict[str, Any] = {"name": "audit", "kind": "webhook", "url": "https://example.org/h"}


def settings(source: dict[str, Any] | None = None, **sections: Any) -> Settings:
    return settings_from_dict({"source": {**SOURCE, **(source or {})}, "sites": SITES,
                               **sections}, environ={})


def test_default_configuration_streams() -> None:
    assert stream_apply_possible(settings()) is True


@pytest.mark.parametrize("sections", [
    {"conflicts": {"strategy": "source_wins"}},
    {"conflicts": {"strategy": "source_wins", "version_column": "updated_at"}},
    {"conflicts": {"tables": {"public.g": {"strategy": "source_wins"}}}},
    {"source": {"streaming": True, "decoding_work_mem": "64kB"}},
], ids=["explicit-source-wins", "version-column", "table-source-wins", "streaming-true"])
def test_source_wins_everywhere_streams(sections: dict[str, Any]) -> None:
    assert stream_apply_possible(settings(**sections)) is True


@pytest.mark.parametrize("sections", [
    {"source": {"streaming": False}},
    {"outbox": {"site": "paris"}},
    {"outbox": {}},
    {"connectors": [WEBHOOK]},
    {"connectors": [WEBHOOK], "outbox": {"site": "berlin"}},
    {"conflicts": {"strategy": "lww"}},
    {"conflicts": {"strategy": "lww", "version_column": "updated_at"}},
    {"conflicts": {"strategy": "first_write_wins"}},
    {"conflicts": {"strategy": "merge", "merge": "pkg.mod:fn"}},
    {"conflicts": {"tables": {"public.g": {"strategy": "lww"}}}},
    {"conflicts": {"strategy": "lww", "tables": {"public.g": {"strategy": "source_wins"}}}},
    {"conflicts": {"tables": {"public.g": {"strategy": "merge", "merge": "pkg.mod:fn"}}}},
    {"conflicts": {"tables": {"public.g": {"counters": ["spent"]}}}},
    {"conflicts": {"tables": {"public.g": {"strategy": "source_wins", "counters": ["spent"]},
                              "public.h": {"strategy": "source_wins"}}}},
], ids=["streaming-false", "outbox", "empty-outbox", "connector", "connector-and-outbox",
        "lww", "lww-version-column", "first-write-wins", "merge", "table-lww",
        "default-lww-table-source-wins", "table-merge", "counters", "counters-on-one-table"])
def test_anything_needing_the_commit_first_turns_streaming_off(sections: dict[str, Any]) -> None:
    assert stream_apply_possible(settings(**sections)) is False

"""Fixtures of the fault suite (on top of ``tests/conftest.py``).

Most fault tests are expensive (several clusters, restarts, subprocesses), so they are pinned
to the default server instead of running once per version:

- ``fault_cluster`` (session): a running ``Cluster`` of ``default_server()`` shared by the
  fault tests; tests must not change its configuration and work in their own databases.
- ``new_db(prefix="db") -> str`` (function): a fresh database on ``fault_cluster`` (its DSN),
  dropped at teardown with whatever uses it (backends, WAL senders, slots).

Tests that need a server they can stop, restart, kill or reconfigure use ``make_cluster()``
(which also defaults to ``default_server()`` here). The cheap tests use ``make_db`` and so run
on every server version.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cdc_sync.embedded import Cluster, default_server

_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


@pytest.fixture(scope="session")
def fault_cluster(cluster_base_dir: Path | None) -> Iterator[Cluster]:
    with Cluster.create(cluster_base_dir, binaries=default_server()) as running:
        yield running


@pytest.fixture
def new_db(fault_cluster: Cluster) -> Iterator[Callable[..., str]]:
    created: list[str] = []

    def make(prefix: str = "db") -> str:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"database prefix {prefix!r}: use [a-z_][a-z0-9_]*, <= 40 chars")
        name = f"{prefix}_{secrets.token_hex(4)}"
        dsn = fault_cluster.create_database(name)
        created.append(name)
        return dsn

    yield make
    for name in reversed(created):
        fault_cluster.drop_database(name)

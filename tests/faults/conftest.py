"""Fixtures of the fault suite (on top of ``tests/conftest.py``).

Most fault tests are expensive (several clusters, restarts, subprocesses), so they are pinned
to the default server instead of running once per version:

- ``fault_cluster`` (session): a running ``Cluster`` of ``default_server()`` shared by the
  fault tests only (never the ``cluster`` of the other suites); tests must not change its
  configuration, stop or kill it, and work in their own databases.
- ``new_db(prefix="db") -> str`` (function): ``make_db`` on ``fault_cluster``: a fresh
  database (its DSN), dropped at teardown with whatever uses it (backends, WAL senders, slots).
  Module-scoped fixtures use ``databases_on(fault_cluster)`` directly.

Tests that need a server they can stop, restart, kill or reconfigure use ``make_cluster()``
(which also defaults to ``default_server()`` here). The cheap tests use ``make_db`` and so run
on every server version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from cdc_sync.embedded import Cluster, default_server


@pytest.fixture(scope="session")
def fault_cluster(cluster_base_dir: Path | None) -> Iterator[Cluster]:
    with Cluster.create(cluster_base_dir, binaries=default_server()) as running:
        yield running


@pytest.fixture
def new_db(
    fault_cluster: Cluster,
    databases_on: Callable[[Cluster], AbstractContextManager[Callable[..., str]]],
) -> Iterator[Callable[..., str]]:
    with databases_on(fault_cluster) as make:
        yield make

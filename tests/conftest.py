"""Shared fixtures: throwaway PostgreSQL clusters (never the server on port 5432).

- ``pg_servers`` (session): ``{major: ServerBinaries}`` of the wanted versions found here
  (15 from the system, 16 from the pgserver wheel; any installation of that major will do).
- ``server_binaries`` (session, params ``pg15``/``pg16``): one of them; a test using it (or
  ``cluster``/``make_db``) runs once per version and is skipped for a missing one. The ``pg16``
  param carries the ``pg16`` marker (``-m "not pg16"`` leaves it out).
- ``cluster`` (session, per version): a running ``Cluster`` shared by the whole session.
  Test clusters live in ``CDC_SYNC_TEST_PGDIR``, else ``/dev/shm`` if it has room, else $TMPDIR.
  Tests must not change its configuration; each one works in its own ``make_db`` database.
- ``cluster_base_dir`` (session): the ``base_dir`` the fixtures pass to ``Cluster.create``.
- ``make_db(prefix="db") -> str`` (function): creates a fresh uniquely named database on
  ``cluster`` and returns its DSN; at teardown its subscriptions, backends, WAL senders and
  replication slots are removed and it is dropped.
- ``databases_on(cluster)`` (session): the factory behind ``make_db`` for any cluster and any
  fixture scope: ``with databases_on(some_cluster) as make: dsn = make("src")``; the databases
  are dropped (as by ``make_db``) when the block ends.
- ``make_cluster(binaries=None, **create_kwargs) -> Cluster`` (function): a separate running
  cluster (for restart/kill tests, several offices); ``binaries`` defaults to the test's
  ``server_binaries`` if it uses that fixture, else ``default_server()``. Destroyed at teardown.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("cdc_sync") is None:  # a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdc_sync.embedded import (
    Cluster,
    ServerBinaries,
    default_server,
    find_server_binaries,
)

WANTED_MAJORS = {15: "system", 16: "pgserver"}
_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
_MIN_FREE_SHM = 2 << 30


def _cluster_base_dir() -> Path | None:
    """Where test clusters live: ``CDC_SYNC_TEST_PGDIR`` if set, else ``/dev/shm`` when it is
    writable with 2 GiB free (creating a cluster there is about 4x faster than on a disk:
    initdb's thousand files), else the temporary directory."""
    configured = os.environ.get("CDC_SYNC_TEST_PGDIR")
    if configured:
        return Path(configured)
    shm = Path("/dev/shm")
    try:
        vfs = os.statvfs(shm)
    except OSError:
        return None
    if os.access(shm, os.W_OK | os.X_OK) and vfs.f_bavail * vfs.f_frsize >= _MIN_FREE_SHM:
        return shm
    return None


@pytest.fixture(scope="session")
def cluster_base_dir() -> Path | None:
    """The ``base_dir`` the fixtures give ``Cluster.create`` (``None``: the temp directory)."""
    return _cluster_base_dir()


@pytest.fixture(scope="session")
def pg_servers() -> dict[int, ServerBinaries]:
    found: dict[int, ServerBinaries] = {}
    for binaries in find_server_binaries():
        if binaries.major not in WANTED_MAJORS:
            continue
        current = found.get(binaries.major)
        preferred = WANTED_MAJORS[binaries.major]
        if current is None or (current.origin != preferred and binaries.origin == preferred):
            found[binaries.major] = binaries
    return found


@pytest.fixture(
    scope="session",
    params=[
        pytest.param(15, id="pg15"),
        pytest.param(16, id="pg16", marks=pytest.mark.pg16),
    ],
)
def server_binaries(
    request: pytest.FixtureRequest, pg_servers: dict[int, ServerBinaries]
) -> ServerBinaries:
    major: int = request.param
    if major not in pg_servers:
        where = "install postgresql-15" if major == 15 else "install the pgserver package"
        pytest.skip(f"PostgreSQL {major} with pgoutput is not available ({where})")
    return pg_servers[major]


@pytest.fixture(scope="session")
def cluster(server_binaries: ServerBinaries, cluster_base_dir: Path | None) -> Iterator[Cluster]:
    with Cluster.create(cluster_base_dir, binaries=server_binaries) as running:
        yield running


@contextmanager
def _databases_on(cluster: Cluster) -> Iterator[Callable[..., str]]:
    created: list[str] = []

    def make(prefix: str = "db") -> str:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"database prefix {prefix!r}: use [a-z_][a-z0-9_]*, <= 40 chars")
        name = f"{prefix}_{secrets.token_hex(4)}"
        dsn = cluster.create_database(name)
        created.append(name)
        return dsn

    try:
        yield make
    finally:
        for name in reversed(created):
            cluster.drop_database(name)


@pytest.fixture(scope="session")
def databases_on() -> Callable[[Cluster], AbstractContextManager[Callable[..., str]]]:
    return _databases_on


@pytest.fixture
def make_db(
    cluster: Cluster,
    databases_on: Callable[[Cluster], AbstractContextManager[Callable[..., str]]],
) -> Iterator[Callable[..., str]]:
    with databases_on(cluster) as make:
        yield make


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, cluster_base_dir: Path | None
) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(binaries: ServerBinaries | None = None, **kwargs: Any) -> Cluster:
        if binaries is None:
            if "server_binaries" in request.fixturenames:
                binaries = request.getfixturevalue("server_binaries")
            else:
                binaries = default_server()
        kwargs.setdefault("base_dir", cluster_base_dir)
        created = Cluster.create(binaries=binaries, **kwargs)
        clusters.append(created)
        return created

    yield make
    for created in reversed(clusters):
        created.destroy()

"""Fixtures of the multi-directional suite (on top of ``tests/conftest.py``).

- ``offices(names, ddl=GRANTS_DDL) -> list[Office]``: one new cluster per office (of the
  test's ``server_binaries``: every test here runs on PG15 and PG16), a database ``office`` on
  each with ``ddl`` run in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pytest

from cdc_sync.embedded import Cluster, ServerBinaries

from .helpers import Office, make_offices

GRANTS_DDL = (
    "CREATE TABLE grants (id int PRIMARY KEY, office text, amount numeric(12,2), note text, "
    "writer text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())",
)


@pytest.fixture
def offices(make_cluster: Callable[..., Cluster], server_binaries: ServerBinaries
            ) -> Callable[..., list[Office]]:
    def make(names: Sequence[str], ddl: Iterable[str] = GRANTS_DDL) -> list[Office]:
        return make_offices(lambda: make_cluster(server_binaries), names, ddl)

    return make

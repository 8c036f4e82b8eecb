"""Fixtures of the integration suite (on top of ``tests/conftest.py``).

- ``env``: a source database and two site databases on the session ``cluster`` (so every test
  using it runs on PG15 and PG16), with ``settings()`` building a unique slot/publication.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from cdc_sync.config import Settings
from cdc_sync.embedded import Cluster

from .helpers import make_settings, settings_dict


@dataclass
class Env:
    cluster: Cluster
    source: str
    sites: list[str]

    def settings(self, sites: list[str] | None = None, **kwargs: Any) -> Settings:
        return make_settings(self.source, self.sites if sites is None else sites, **kwargs)

    def settings_dict(self, sites: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        return settings_dict(self.source, self.sites if sites is None else sites, **kwargs)


@pytest.fixture
def env(cluster: Cluster, make_db: Callable[..., str]) -> Env:
    return Env(cluster, make_db("src"), [make_db("site_a"), make_db("site_b")])

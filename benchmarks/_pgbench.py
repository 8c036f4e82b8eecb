"""pgbench schema helpers shared by scenarios (c) and (d).

``pgbench_history`` has no primary key, which native replication needs for updates and
deletes and cdc-sync for keyed apply: both get a ``hid bigserial PRIMARY KEY`` column, at the
source and on every site.
"""

from __future__ import annotations

import re

from benchmarks.harness import Harness

TABLES = (
    "public.pgbench_accounts",
    "public.pgbench_branches",
    "public.pgbench_tellers",
    "public.pgbench_history",
)
HISTORY_PK = "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY"
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


def init_source(harness: Harness, dbname: str, scale: int) -> None:
    """A fresh source database with pgbench's tables and data at ``scale``."""
    harness.source_db(dbname)
    harness.pgbench(dbname, "-i", "-q", "-s", str(scale))
    harness.source.execute(HISTORY_PK, dbname=dbname)


def init_site(harness: Harness, dbname: str, scale: int, *, data: bool) -> None:
    """A fresh site database with pgbench's tables and primary keys; with ``data`` also the
    rows ``pgbench -i`` generates (the same as the source's before any run), else empty."""
    harness.site_db(dbname)
    steps = ["-i", "-q", "-s", str(scale)] + ([] if data else ["-I", "dtp"])
    harness.pgbench(dbname, *steps, cluster=harness.site)
    harness.site.execute(HISTORY_PK, dbname=dbname)


def parse_tps(output: str) -> float | None:
    match = _TPS.search(output)
    return float(match.group(1)) if match else None

"""The big-UPDATE workload shared by scenarios (a), (b) and (e).

``fanout_scenario`` builds scenarios (a) and (b), which differ only in their site count; their
modules (``update_one_site``, ``update_three_sites``) just register it.

The source database ``bench_<key>`` holds ``bench_rows`` (``rows`` rows, four columns, an
integer primary key) and ``bench_marker``. Native subscriber databases ``native_<key><n>`` get
the same rows up front (the same ``generate_series`` fill) and a subscription with
``copy_data = false``; cdc-sync site databases ``cdc_<key><n>`` get the same, empty, tables and
``cdc-sync init`` copies the rows. The workload is one ``UPDATE bench_rows SET x = x + 1``: one
transaction changing every row.

Knobs for comparing cdc-sync's own settings on this workload (the targets are for the
defaults): ``CDC_SYNC_UPDATE_STRATEGY`` sets ``[conflicts] strategy`` (e.g. ``lww``, on commit
time: then the big transaction is streamed and spooled, see README "Large transactions"),
``CDC_SYNC_UPDATE_STREAMING=off`` sets ``[source] streaming = false``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from benchmarks.harness import (
    MARKER_SITE_DDL,
    MARKER_SOURCE_DDL,
    CdcSync,
    Conn,
    Harness,
    NativeReplication,
    alternate,
    log,
    measure_attached,
)
from benchmarks.report import Measurement, Scenario, Target

TABLES = ("public.bench_rows", "public.bench_marker")
ROWS_DDL = ("CREATE TABLE bench_rows (id int PRIMARY KEY, v text NOT NULL, n numeric NOT NULL, "
            "x int NOT NULL)")
ROWS_FILL = "INSERT INTO bench_rows SELECT g, 'v' || g, g * 1.5, g FROM generate_series(1, {n}) g"
UPDATE = "UPDATE bench_rows SET x = x + 1"
FANOUT_ROWS = 300_000


@dataclass
class UpdateSetup:
    source_db: str
    cdc: CdcSync
    native: NativeReplication | None


def setup(harness: Harness, key: str, *, rows: int, sites: int, native: bool) -> UpdateSetup:
    """Create the source, the site databases and both systems (see the module docstring)."""
    fill = ROWS_FILL.format(n=int(rows))
    source_db = f"bench_{key}"
    harness.source_db(source_db)
    log(f"  source {source_db}: {rows} rows")
    for statement in (ROWS_DDL, MARKER_SOURCE_DDL, fill):
        harness.source.execute(statement, dbname=source_db)
    replication: NativeReplication | None = None
    if native:
        native_dbs = [f"native_{key}{n}" for n in range(1, sites + 1)]
        for n, db in enumerate(native_dbs, 1):
            harness.site_db(db, n)
            for statement in (ROWS_DDL, MARKER_SITE_DDL, fill):
                harness.site_cluster(db).execute(statement, dbname=db)
        replication = NativeReplication(harness, f"native_{key}", source_db, native_dbs, TABLES)
        replication.create()
    cdc_dbs = [f"cdc_{key}{n}" for n in range(1, sites + 1)]
    for n, db in enumerate(cdc_dbs, 1):
        harness.site_db(db, n)
        for statement in (ROWS_DDL, MARKER_SITE_DDL):
            harness.site_cluster(db).execute(statement, dbname=db)
    cdc = CdcSync(harness, f"cdc_{key}", source_db, cdc_dbs, TABLES)
    _apply_knobs(cdc)
    log(f"  cdc-sync init ({len(cdc_dbs)} sites)")
    cdc.init()
    return UpdateSetup(source_db=source_db, cdc=cdc, native=replication)


def _apply_knobs(cdc: CdcSync) -> None:
    """``CDC_SYNC_UPDATE_STRATEGY`` / ``CDC_SYNC_UPDATE_STREAMING`` (module doc) into the config."""
    text = cdc.config.read_text()
    if os.environ.get("CDC_SYNC_UPDATE_STREAMING", "on") == "off":
        text = text.replace("\n\n[[sites]]", "\nstreaming = false\n\n[[sites]]", 1)
    strategy = os.environ.get("CDC_SYNC_UPDATE_STRATEGY")
    if strategy:
        text += f'\n[conflicts]\nstrategy = "{strategy}"\n'
        log(f"  cdc-sync strategy {strategy}, streaming "
            f"{os.environ.get('CDC_SYNC_UPDATE_STREAMING', 'on')}")
    cdc.config.write_text(text)


def update_all(source: Conn) -> None:
    source.execute(UPDATE)


def measure_fanout(harness: Harness, key: str, *, rows: int, sites: int,
                   repetitions: int, timeout: float = 900) -> Measurement:
    """Seconds from the UPDATE's commit until every site applied it, for both systems."""
    s = setup(harness, key, rows=rows, sites=sites, native=True)
    assert s.native is not None
    native = s.native
    samples = alternate(repetitions, {
        "native": lambda: measure_attached(harness, native, s.source_db, update_all,
                                           timeout=timeout),
        "cdc-sync": lambda: measure_attached(harness, s.cdc, s.source_db, update_all,
                                             timeout=timeout),
    })
    result = Measurement(cdc_sync=samples["cdc-sync"], native=samples["native"],
                         details={"rows": rows, "sites": sites})
    cdc_rate = rows / max(min(result.cdc_sync), 1e-9)
    native_rate = rows / max(min(samples["native"]), 1e-9)
    result.details["summary"] = (f"best rate per site: cdc-sync {cdc_rate:,.0f} rows/s, "
                                 f"native {native_rate:,.0f} rows/s")
    return result


def fanout_scenario(key: str, *, sites: int, ratio: float, rows: int = FANOUT_ROWS) -> Scenario:
    """Scenario ``key``: one ``rows``-row UPDATE replicated to ``sites`` sites, seconds from its
    commit until every site applied it (``measure_fanout``); target: cdc-sync / native ≤ ``ratio``."""

    def run(harness: Harness, repetitions: int) -> Measurement:
        return measure_fanout(harness, key, rows=rows, sites=sites, repetitions=repetitions)

    return Scenario(
        key=key,
        title=f"{rows // 1000}k-row UPDATE → {sites} site{'' if sites == 1 else 's'}",
        metric="commit → applied" if sites == 1 else "commit → all applied",
        unit="s",
        target=Target("ratio", ratio),
        run=run,
        sites=sites,
    )

"""(d) Initial copy of a pgbench scale-5 database (500,000 accounts) to one site.

Both systems copy into the same pre-created tables (``pgbench -i -I dtp``: tables and primary
keys, no rows) in a fresh subscriber database each repetition. Native: the wall time from
``CREATE SUBSCRIPTION … WITH (copy_data = true)`` until every table is ready
(``pg_subscription_rel.srsubstate = 'r'``). cdc-sync: the wall time of ``cdc-sync init`` (which
also creates its slot and publication and migrates its schema on the site). Target: ratio ≤ 1.

The frozen copy of cdc-sync's code is byte-compiled once, untimed, before the repetitions: an
installed cdc-sync has its bytecode (pip compiles at install), whereas the frozen copy has none
and, with ``PYTHONDONTWRITEBYTECODE`` set, would be compiled again by every timed process.
"""

from __future__ import annotations

import compileall
import time

from benchmarks import _pgbench
from benchmarks.harness import BenchError, CdcSync, Harness, NativeReplication, alternate, wait_for
from benchmarks.report import Measurement, Scenario, Target

SCALE = 5
SOURCE_DB = "bench_d"


def _check_copied(harness: Harness, dbname: str) -> None:
    rows = harness.site.execute("SELECT count(*) FROM pgbench_accounts", dbname=dbname)[0][0]
    if rows != SCALE * 100_000:
        raise BenchError(f"{dbname}: {rows} rows in pgbench_accounts after the copy, "
                         f"expected {SCALE * 100_000}")


def _native(harness: Harness, native: NativeReplication) -> float:
    db = "native_d1"
    _pgbench.init_site(harness, db, SCALE, data=False)
    harness.quiesce(SOURCE_DB, [db])
    start = time.monotonic()
    native.create_subscription(db, copy_data=True, enabled=True)
    wait_for(lambda: native.synced(db, len(_pgbench.TABLES)), timeout=1800, interval=0.02,
             what="the native initial copy")
    elapsed = time.monotonic() - start
    _check_copied(harness, db)
    native.drop_subscription(db)
    harness.site.drop_database(db)
    return elapsed


def _cdc_sync(harness: Harness) -> float:
    db = "cdc_d1"
    _pgbench.init_site(harness, db, SCALE, data=False)
    harness.quiesce(SOURCE_DB, [db])
    cdc = CdcSync(harness, "cdc_d", SOURCE_DB, [db], _pgbench.TABLES)
    elapsed = cdc.init()
    _check_copied(harness, db)
    cdc.teardown()
    harness.site.drop_database(db)
    return elapsed


def run(harness: Harness, repetitions: int) -> Measurement:
    compileall.compile_dir(harness.workdir / "code", quiet=1)
    _pgbench.init_source(harness, SOURCE_DB, SCALE)
    native = NativeReplication(harness, "native_d", SOURCE_DB, ["native_d1"], _pgbench.TABLES)
    native.create_publication()
    samples = alternate(repetitions, {
        "native": lambda: _native(harness, native),
        "cdc-sync": lambda: _cdc_sync(harness),
    })
    return Measurement(cdc_sync=samples["cdc-sync"], native=samples["native"],
                       details={"scale": SCALE, "accounts": SCALE * 100_000})


SCENARIO = Scenario(
    key="d",
    title=f"initial copy, pgbench scale {SCALE}",
    metric="wall time",
    unit="s",
    target=Target("ratio", 1.0),
    run=run,
)

"""Benchmark: apply rate of a conflict-heavy workload, LWW versus plain source_wins.

Standalone (not collected by pytest):

    .venv/bin/python tests/multi/bench_conflicts.py [--changes N] [--tx-sizes 1,100]
        [--pg 15|16] [--repeat R]

Workload: a source database and one site database on a throwaway cluster. The site already
holds every key (written locally, before the source's writes: older), then the source inserts
the same keys in transactions of `tx-size` rows. Every incoming insert therefore meets a local
row: under `lww` each one is an `insert_insert` conflict that the incoming row wins (fetch the
local rows and tombstones, resolve, upsert, log the conflict); under `source_wins` the same
changes take the fast path (plain upserts, nothing fetched, nothing logged). "lww, no
conflicts" is the same backlog applied to an empty site table: the resolving path without a
single conflict.

The backlog is written while no replicator runs, then the pipeline starts. `seconds` runs from
the start of the first target transaction to the commit of the last (`on_applied`), and
`changes/s` = changes / seconds; `wall s` is from starting the pipeline until the site holds a
sync point committed after the backlog (connections, slot start-up and polling included);
`commits` counts the target transactions.

Variants: `source_wins`; `lww` without conflicts; `lww` with source commit timestamps (each
source transaction gets its own target transaction stamped with the source commit time); `lww`
with `version_column = "updated_at"` (source transactions may share a target transaction).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The repository root: cdc_sync (when not pip-installed) and tests.integration.helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg

from cdc_sync import commands
from cdc_sync.config import settings_from_dict
from cdc_sync.embedded import Cluster, default_server, find_server_binaries
from tests.integration.helpers import PipelineThread, wait_until_caught_up

DDL = ("CREATE TABLE grants (id int PRIMARY KEY, office text, amount numeric(12,2), note text, "
       "writer text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())")

# name -> ([conflicts] table or None, whether the site holds every key beforehand)
VARIANTS: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "source_wins": (None, True),
    "lww, no conflicts": ({"strategy": "lww"}, False),
    "lww (commit ts)": ({"strategy": "lww"}, True),
    "lww (version_column)": ({"strategy": "lww", "version_column": "updated_at"}, True),
}


def _exec(dsn: str, *statements: str, params: Any = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s, params)


def run_once(cluster: Cluster, variant: str, changes: int, tx_size: int) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    src = cluster.create_database(f"bsrc_{tag}")
    site = cluster.create_database(f"bsite_{tag}")
    try:
        _exec(src, DDL)
        _exec(site, DDL)
        data: dict[str, Any] = {
            "source": {"name": "hq", "dsn": src, "slot": f"b_{tag}", "publication": f"b_{tag}"},
            "sites": [{"name": "office", "dsn": site}],
        }
        conflicts, conflicting = VARIANTS[variant]
        if conflicts is not None:
            data["conflicts"] = conflicts
        settings = settings_from_dict(data)
        commands.init(settings)
        # The site's own (older) rows for every key.
        if conflicting:
            _exec(site, "INSERT INTO grants (id, office, amount, note, writer) "
                        "SELECT i, 'office', i %% 1000, 'local', 'office' "
                        "FROM generate_series(1, %s) i", params=(changes,))
        # The source's backlog: the same keys, newer, in transactions of tx_size rows.
        with psycopg.connect(src, autocommit=False) as conn:
            for first in range(1, changes + 1, tx_size):
                last = min(changes, first + tx_size - 1)
                conn.execute("INSERT INTO grants (id, office, amount, note, writer) "
                             "SELECT i, 'hq', i %% 997, 'remote', 'hq' "
                             "FROM generate_series(%s::int, %s::int) i", (first, last))
                conn.commit()
        commits: list[tuple[float, int, float]] = []  # (when, changes, seconds) per target commit

        def on_applied(_worker: object, n: int, seconds: float) -> None:
            commits.append((time.perf_counter(), n, seconds))

        started = time.perf_counter()
        runner = PipelineThread(settings, on_applied=on_applied).start()
        try:
            wait_until_caught_up(settings, timeout=600, pipeline=runner.pipeline)
            wall = time.perf_counter() - started
        finally:
            runner.stop()
        applying = [c for c in commits if c[1] > 0]
        elapsed = applying[-1][0] - (applying[0][0] - applying[0][2])
        with psycopg.connect(site) as conn:
            remote = conn.execute("SELECT count(*) FROM grants WHERE writer = 'hq'").fetchone()
            logged = conn.execute("SELECT count(*) FROM cdc_sync.conflicts").fetchone()
        assert remote is not None and remote[0] == changes, f"{variant}: {remote} of {changes}"
        commands.teardown(settings)
        return {"variant": variant, "tx_size": tx_size, "changes": changes,
                "seconds": elapsed, "rate": changes / elapsed, "wall": wall,
                "target_commits": len(applying),
                "conflicts": logged[0] if logged else 0}
    finally:
        cluster.drop_database(f"bsrc_{tag}")
        cluster.drop_database(f"bsite_{tag}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20_000,
                        help="changes per run with the largest transactions (default 20000)")
    parser.add_argument("--tx-sizes", default="1,100",
                        help="rows per source transaction, comma-separated (default 1,100)")
    parser.add_argument("--single-row-changes", type=int, default=5_000,
                        help="changes per run with 1-row transactions (default 5000)")
    parser.add_argument("--pg", type=int, default=None, help="server major version")
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure (median)")
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="variant names separated by ; (default: all)")
    args = parser.parse_args(argv)
    binaries = default_server()
    if args.pg is not None:
        binaries = next(b for b in find_server_binaries() if b.major == args.pg)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else None
    print(f"server: {binaries}; one source, one site, {os.cpu_count()} CPUs")
    print(f"{'variant':<22} {'tx rows':>7} {'changes':>8} {'seconds':>8} {'changes/s':>10} "
          f"{'wall s':>7} {'commits':>7} {'conflicts':>9}")
    with Cluster.create(base, binaries=binaries) as cluster:
        for tx_size in (int(x) for x in args.tx_sizes.split(",")):
            changes = args.single_row_changes if tx_size == 1 else args.changes
            for variant in args.variants.split(";"):
                results = [run_once(cluster, variant, changes, tx_size)
                           for _ in range(args.repeat)]
                rate = statistics.median(r["rate"] for r in results)
                secs = statistics.median(r["seconds"] for r in results)
                wall = statistics.median(r["wall"] for r in results)
                print(f"{variant:<22} {tx_size:>7} {changes:>8} {secs:>8.2f} {rate:>10.0f} "
                      f"{wall:>7.2f} {results[0]['target_commits']:>7} "
                      f"{results[0]['conflicts']:>9}", flush=True)


if __name__ == "__main__":
    main()

"""The command line: run the selected scenarios on one pair of clusters and report.

``python -m benchmarks [--quick] [--only a,b] [--server 15|16] [--repetitions N]
[--native-streaming off|on|parallel] [--one-site-cluster] [--bus] [--results-dir DIR]``

Prints the results table on stdout (progress on stderr) and writes
``benchmarks/results/latest.json`` and ``latest.md``. Exit status 0 when every scenario
finished (whether or not it met its target), 1 when one failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import (
    apply_memory,
    backlog,
    initial_copy,
    mesh,
    pgbench_latency,
    update_one_site,
    update_three_sites,
)
from benchmarks.harness import BenchError, Harness, log, nats_server
from benchmarks.report import Scenario, ScenarioResult, text_table, write_results
from cdc_sync.embedded.cluster import ClusterError

SCENARIOS: dict[str, Scenario] = {
    sc.key: sc
    for sc in (
        update_one_site.SCENARIO,
        update_three_sites.SCENARIO,
        pgbench_latency.SCENARIO,
        initial_copy.SCENARIO,
        apply_memory.SCENARIO,
        backlog.SCENARIO,
        mesh.SCENARIO,
    )
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_REPETITIONS = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare cdc-sync with PostgreSQL's native logical replication.",
        epilog="scenarios: " + "; ".join(f"{k}: {s.title}" for k, s in SCENARIOS.items()))
    parser.add_argument("--quick", action="store_true",
                        help="one repetition per scenario instead of three (and a smaller "
                             "backlog for (f))")
    parser.add_argument("--only", metavar="a,b",
                        help="comma-separated scenario letters (default: all)")
    parser.add_argument("--server", type=int, default=15, metavar="MAJOR",
                        help="PostgreSQL major version for both clusters (default 15: the "
                             "system's; 16: pgserver's)")
    parser.add_argument("--repetitions", type=int, metavar="N",
                        help=f"repetitions per scenario (default {DEFAULT_REPETITIONS}, "
                             "1 with --quick)")
    parser.add_argument("--native-streaming", choices=("off", "on", "parallel"), default="off",
                        help="the native subscriptions' `streaming` option (default off, "
                             "PostgreSQL's default; `parallel` needs 16)")
    parser.add_argument("--one-site-cluster", action="store_true",
                        help="put every site database in one subscriber cluster (by default "
                             "each site of a scenario has its own, as in production)")
    parser.add_argument("--bus", action="store_true",
                        help="run every cdc-sync through NATS JetStream (`[bus]`: capture and "
                             "appliers in one `cdc-sync run`; a nats-server is started)")
    parser.add_argument("--bus-processes", action="store_true",
                        help="with --bus: `cdc-sync capture` and one `cdc-sync apply --site` "
                             "per site as processes of their own (the scale-out shape) "
                             "instead of one `run`")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where latest.json and latest.md go (default benchmarks/results)")
    return parser


def _select(parser: argparse.ArgumentParser, only: str | None) -> list[Scenario]:
    if not only:
        return list(SCENARIOS.values())
    keys = [k.strip().lower() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown or not keys:
        parser.error(f"--only: unknown scenario {', '.join(unknown) or '(none)'}; "
                     f"choose from {','.join(SCENARIOS)}")
    return [SCENARIOS[k] for k in SCENARIOS if k in keys]


def _run_one(harness: Harness, scenario: Scenario, repetitions: int) -> ScenarioResult:
    log(f"({scenario.key}) {scenario.title}")
    started = time.monotonic()
    try:
        measured = scenario.run(harness, repetitions)
        result = ScenarioResult(scenario, measured.cdc_sync, measured.native, measured.details)
    except Exception as exc:  # one broken scenario must not lose the others' results
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, BenchError):
            traceback.print_exc(file=sys.stderr)
            message = f"{type(exc).__name__}: {message}"
        log(f"({scenario.key}) failed: {message}")
        result = ScenarioResult(scenario, error=message)
    finally:
        try:
            harness.reset()
        except Exception as exc:
            log(f"({scenario.key}) clean-up failed: {exc}")
    result.details["elapsed_s"] = round(time.monotonic() - started, 1)
    log(f"({scenario.key}) done in {result.details['elapsed_s']:.0f} s: "
        f"cdc-sync {result.cdc_sync_samples}, native {result.native_samples}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    scenarios = _select(parser, args.only)
    if args.quick:  # (f) also drains a smaller backlog
        scenarios = [backlog.scenario(quick=True) if s.key == "f" else s for s in scenarios]
    repetitions = args.repetitions or (1 if args.quick else DEFAULT_REPETITIONS)
    if repetitions < 1:
        parser.error("--repetitions must be at least 1")
    results: list[ScenarioResult] = []
    load_before = os.getloadavg()
    site_clusters = 1 if args.one_site_cluster else max(s.sites for s in scenarios)
    try:
        with Harness.open(args.server, site_clusters=site_clusters) as harness, \
                contextlib.ExitStack() as bus:
            harness.native_streaming = args.native_streaming
            if args.bus or args.bus_processes:
                harness.bus_url = bus.enter_context(nats_server(harness.workdir))
                harness.bus_processes = args.bus_processes
            server, code = harness.server, harness.code
            for scenario in scenarios:
                results.append(_run_one(harness, scenario, repetitions))
    except (BenchError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "server": server,
        "cdc_sync_code": code,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "repetitions": repetitions,
        "quick": args.quick,
        "native_streaming": args.native_streaming,
        "bus": args.bus or args.bus_processes,
        "bus_processes": args.bus_processes,
        "site_clusters": site_clusters,
        "scenarios_run": [s.key for s in scenarios],
        # 1-minute load averages: far above the CPU count, other work competed with the run
        "load_average": {"start": round(load_before[0], 2),
                         "end": round(os.getloadavg()[0], 2)},
    }
    shape = (" through NATS JetStream (capture and appliers as processes)" if args.bus_processes
             else " through NATS JetStream" if args.bus else "")
    print(f"\ncdc-sync{shape} vs. native logical "
          f"replication — {server}, median of {repetitions}"
          f"{'' if args.native_streaming == 'off' else ', native streaming ' + args.native_streaming}\n")
    print(text_table(results), end="")
    cpus = os.cpu_count() or 1
    if max(meta["load_average"].values()) > cpus:
        print(f"\nwarning: load average {meta['load_average']} on {cpus} CPUs: other work "
              "competed with this run; its figures are noisy")
    json_path, md_path = write_results(results, meta, args.results_dir)
    print(f"\nwritten: {json_path}, {md_path}")
    return 1 if any(r.error is not None for r in results) else 0

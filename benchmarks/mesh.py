"""(g) Three offices writing the same rows at once: the multi-directional mesh under load.

Each subscriber cluster is an office (Washington, Berlin, Tokyo: ``--one-site-cluster`` is
not used here, the scenario asks for three clusters). Every office has ``grants(id int primary
key, office, amount, note, updated_at)`` with ``KEYS`` rows and a ``probe`` table, and runs
its own ``cdc-sync run`` (its database as source, the other two as sites, ``[conflicts]
strategy = "lww"`` on commit timestamps). For ``DURATION`` seconds pgbench runs at every office
at once at ``RATE`` transactions/s (``-R``), each transaction one ``UPDATE`` of a random grant
out of the same ``KEYS``: the three offices change the same rows concurrently, so the
replicators resolve a stream of real conflicts. A probe writer per office inserts a row every
20 ms; at the other offices a ``BEFORE INSERT`` trigger (``ENABLE ALWAYS``, so it fires under
the appliers' ``session_replication_role = replica``) stamps its arrival, and ``dst_ts -
src_ts`` (one machine, one clock) is the probe's lag.

Reported: the p99 probe lag over all six office pairs (the table; target ≤ 1 s), and in the
notes the rate pgbench achieved per office, p50 and worst lag, the conflicts logged and whether
the three offices ended identical (checked after the run: a mesh that is fast but diverges
has failed). Native logical replication has no comparable figure: it cannot resolve
conflicts, and on PostgreSQL 15 (no ``origin = none``) three offices subscribing to each other
would send every change round in a loop.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchError, Harness, connect, log, stop_process, wait_for
from benchmarks.pgbench_latency import PROBE_INTERVAL, percentile
from benchmarks.report import Measurement, Scenario, Target
from cdc_sync.embedded import Cluster

OFFICES = ("berlin", "tokyo", "washington")
DB = "mesh_g"
KEYS = 1000
# transactions (conflicting changes) per second, per office; CDC_SYNC_MESH_RATE overrides it
# (to find the rate this machine sustains)
RATE = int(os.environ.get("CDC_SYNC_MESH_RATE", "2000"))
TARGET_RATE = 2000
PROBES_PER_RUN = 1_000_000  # repetition r numbers its probes from r * PROBES_PER_RUN + 1
DURATION = int(os.environ.get("CDC_SYNC_MESH_SECONDS", "20"))
CLIENTS = 2
LAG_P99_MAX_MS = 1000.0
SETTLE_TIMEOUT = 600.0
TABLES = ("public.grants", "public.probe")

DDL = (
    "CREATE TABLE grants (id int PRIMARY KEY, office text, amount numeric(12,2) NOT NULL, "
    "note text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE probe (office text NOT NULL, n bigint NOT NULL, "
    "src_ts timestamptz NOT NULL DEFAULT clock_timestamp(), dst_ts timestamptz, "
    "PRIMARY KEY (office, n))",
    "CREATE FUNCTION probe_stamp() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN NEW.dst_ts := clock_timestamp(); RETURN NEW; END$$",
    "CREATE TRIGGER probe_stamp BEFORE INSERT ON probe FOR EACH ROW "
    "EXECUTE FUNCTION probe_stamp()",
    "ALTER TABLE probe ENABLE ALWAYS TRIGGER probe_stamp",
)
SCRIPT = ("\\set k random(1, {keys})\n"
          "UPDATE grants SET amount = amount + 1, office = '{office}', "
          "updated_at = clock_timestamp() WHERE id = :k;\n")


def _toml(value: str | Sequence[str]) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml(v) for v in value) + "]"


class Office:
    """One office: its cluster, its database, its replicator's config and process."""

    def __init__(self, harness: Harness, name: str, cluster: Cluster) -> None:
        self.h = harness
        self.name = name
        self.cluster = cluster
        self.dsn = cluster.dsn(DB)
        self.config = harness.workdir / f"mesh_{name}.toml"
        self.log_path = harness.workdir / f"mesh_{name}.log"
        self.proc: Any = None

    def write_config(self, others: Sequence[Office]) -> None:
        lines = ["[source]", f"name = {_toml(self.name)}", f"dsn = {_toml(self.dsn)}",
                 f"slot = {_toml('cdc_g_' + self.name)}",
                 f"publication = {_toml('cdc_g_' + self.name)}", f"tables = {_toml(TABLES)}"]
        for o in others:
            lines += ["", "[[sites]]", f"name = {_toml(o.name)}", f"dsn = {_toml(o.dsn)}"]
        lines += ["", "[conflicts]", f"strategy = {_toml(os.environ.get('CDC_SYNC_MESH_STRATEGY', 'lww'))}"]
        self.config.write_text("\n".join(lines) + "\n")

    def command(self, verb: str) -> list[str]:
        return [sys.executable, "-m", "cdc_sync", verb, "-c", str(self.config)]


class Prober(threading.Thread):
    """Inserts (office, n) into `probe` every PROBE_INTERVAL seconds until stopped."""

    def __init__(self, office: Office, first: int = 1) -> None:
        super().__init__(name=f"probe-{office.name}", daemon=True)
        self.office = office
        self.first = first  # numbers start here: each repetition's probes are its own
        self.count = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.office.dsn) as conn:
                due = time.monotonic()
                while not self.halt.is_set():
                    self.count += 1
                    conn.execute("INSERT INTO probe (office, n) VALUES (%s, %s)",
                                 (self.office.name, self.first + self.count - 1))
                    due += PROBE_INTERVAL
                    self.halt.wait(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # reported by the run
            self.error = exc


def _setup(harness: Harness) -> list[Office]:
    if len(harness.sites) < len(OFFICES):
        raise BenchError(f"(g) needs {len(OFFICES)} subscriber clusters")
    offices = [Office(harness, n, c) for n, c in zip(OFFICES, harness.sites, strict=False)]
    for o in offices:
        o.cluster.drop_database(DB)
        o.cluster.create_database(DB)
        for statement in DDL:
            o.cluster.execute(statement, dbname=DB)
    for o in offices:  # the same rows everywhere (init's copy finds them equal)
        o.cluster.execute("INSERT INTO grants (id, office, amount, note) SELECT g, 'seed', 0, "
                          "'grant ' || g FROM generate_series(1, %s) AS g", params=(KEYS,),
                          dbname=DB)
    for o in offices:
        o.write_config([p for p in offices if p is not o])
    for o in offices:
        log(f"  cdc-sync init ({o.name})")
        with o.log_path.open("ab") as out:
            done = subprocess.run(o.command("init"), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=out, timeout=600, check=False, env=harness.env,
                                  cwd=harness.workdir)
        if done.returncode != 0:
            raise BenchError(f"cdc-sync init ({o.name}) exited with {done.returncode}")
    return offices


def _fingerprint(o: Office) -> list[str]:
    with connect(o.dsn) as conn:
        return [r[0] for r in conn.execute("SELECT g::text FROM grants AS g ORDER BY id")]


def _one_run(harness: Harness, offices: list[Office], run_no: int) -> dict[str, Any]:
    for o in offices:
        o.cluster.execute("VACUUM (ANALYZE)", dbname=DB)
        o.cluster.execute("CHECKPOINT")
    for o in offices:
        o.proc = harness.spawn(o.command("run"), o.log_path)
    try:
        for o in offices:
            def streaming(o: Office = o) -> bool:
                if o.proc.poll() is not None:
                    raise BenchError(f"cdc-sync run ({o.name}) exited with {o.proc.returncode}")
                rows = o.cluster.execute("SELECT bool_and(active) FROM pg_replication_slots "
                                         "WHERE slot_name = %s", params=("cdc_g_" + o.name,),
                                         dbname=DB)
                return bool(rows and rows[0][0])
            wait_for(streaming, timeout=120, what=f"cdc-sync run ({o.name}) to stream")
        first = run_no * PROBES_PER_RUN + 1
        probers = [Prober(o, first) for o in offices]
        scripts = []
        for o in offices:
            path = harness.workdir / f"mesh_{o.name}.sql"
            path.write_text(SCRIPT.format(keys=KEYS, office=o.name))
            scripts.append(path)
        outputs: dict[str, str] = {}
        errors: list[BaseException] = []

        def bench(o: Office, script: Path) -> None:
            try:
                outputs[o.name] = harness.pgbench(
                    DB, "-n", "-f", str(script), "-R", str(RATE), "-T", str(DURATION),
                    "-c", str(CLIENTS), "-j", str(CLIENTS), cluster=o.cluster,
                    timeout=DURATION + 300)
            except BaseException as exc:
                errors.append(exc)

        writing = int(os.environ.get("CDC_SYNC_MESH_WRITING", str(len(offices))))
        benches = [threading.Thread(target=bench, args=(o, s)) for o, s in
                   list(zip(offices, scripts, strict=True))[:writing]]
        for t in (*probers, *benches):
            t.start()
        for t in benches:
            t.join()
        for p in probers:
            p.halt.set()
            p.join()
        if errors:
            raise BenchError(f"pgbench failed: {errors[0]}")
        for p in probers:
            if p.error is not None:
                raise BenchError(f"probe writer failed: {p.error}")
        counts = {p.office.name: p.count for p in probers}
        began = time.monotonic()

        def settled() -> bool:
            for o in offices:
                with connect(o.dsn) as conn:
                    for other, n in counts.items():
                        if other == o.name:
                            continue
                        row = conn.execute("SELECT count(*) FROM probe WHERE office = %s "
                                           "AND n >= %s", (other, first)).fetchone()
                        if row is None or row[0] < n:
                            return False
            return True

        wait_for(settled, timeout=SETTLE_TIMEOUT, what="every probe row at every office")
        drain = time.monotonic() - began
        lags: list[float] = []
        for o in offices:
            with connect(o.dsn) as conn:
                lags += [float(ms) for (ms,) in conn.execute(
                    "SELECT extract(epoch FROM dst_ts - src_ts) * 1000 FROM probe "
                    "WHERE office <> %s AND n >= %s", (o.name, first))]
        # Identical? Give in-flight grants changes (behind the last probe) a moment.
        identical = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            prints = [_fingerprint(o) for o in offices]
            if all(p == prints[0] for p in prints):
                identical = True
                break
            time.sleep(1)
        conflicts = 0
        for o in offices:
            with connect(o.dsn) as conn:
                row = conn.execute("SELECT count(*) FROM cdc_sync.conflicts").fetchone()
                conflicts += int(row[0]) if row else 0
        tps = {}
        for name, out in outputs.items():
            for line in out.splitlines():
                if line.startswith("tps = "):
                    tps[name] = float(line.split()[2])
    finally:
        for o in offices:
            if o.proc is not None:
                stop_process(o.proc)
                o.proc = None
    log(f"  (g) run {run_no}: p99 {percentile(lags, 0.99):.0f} ms, tps {tps}, identical "
        f"{identical}")
    return {"p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99), "max": max(lags),
            "probes": len(lags), "tps": tps, "identical": identical, "drain_s": drain,
            "conflicts_total": conflicts}


def run(harness: Harness, repetitions: int) -> Measurement:
    offices = _setup(harness)
    runs = []
    for r in range(repetitions):
        runs.append(_one_run(harness, offices, r + 1))
    min_tps = min(min(r["tps"].values(), default=0.0) for r in runs)
    details: dict[str, Any] = {
        "runs": runs, "rate_per_office": RATE, "keys": KEYS, "duration_s": DURATION,
        "p50_ms": statistics.median(r["p50"] for r in runs),
        "max_ms": max(r["max"] for r in runs),
        "min_office_tps": min_tps,
        "identical": all(r["identical"] for r in runs),
    }
    verdict = {True: "ok", False: "MISSED"}
    details["summary"] = (
        f"3 offices × pgbench -R {RATE} ({CLIENTS} clients) updating the same {KEYS} grants "
        "for "
        f"{DURATION} s; lowest rate achieved at an office {min_tps:.0f} tps (target ≥ "
        f"{TARGET_RATE}: {verdict[min_tps >= TARGET_RATE * 0.97]}); lag p50 "
        f"{details['p50_ms']:.0f} ms, worst "
        f"{details['max_ms']:.0f} ms; conflicts logged per run "
        f"{[r['conflicts_total'] for r in runs]} (cumulative); offices identical after every "
        f"run: {details['identical']}; no native figure (native cannot resolve conflicts, and "
        "on PostgreSQL 15 a mesh of subscriptions loops)")
    if not details["identical"]:
        raise BenchError("the offices did not end identical: " + details["summary"])
    return Measurement(cdc_sync=[r["p99"] for r in runs], native=None, details=details)


SCENARIO = Scenario(
    key="g",
    title=f"3-office mesh, {RATE} conflicting tx/s per office",
    metric="probe lag p99",
    unit="ms",
    target=Target("cdc_sync", LAG_P99_MAX_MS),
    run=run,
    sites=3,
)

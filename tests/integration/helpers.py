"""Shared helpers of the integration suite: settings, a pipeline in a thread, the CLI as a
subprocess, waiting for the sites to catch up, and comparing tables by their text form.

Every comparison is done in PostgreSQL's own text form (`SELECT t::text FROM t ORDER BY 1`),
so a value that differs in any way (precision, NaN, infinity, whitespace of json) shows up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdc_sync import commands
from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.pipeline import Pipeline
from cdc_sync.protocol import Lsn

REPO_ROOT = Path(__file__).resolve().parents[2]

# The session settings the replicator uses: compare values in the same text form.
COMPARE_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "
    "-c bytea_output=hex"
)


# -- connections -------------------------------------------------------------------------------

def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=autocommit, options=COMPARE_OPTIONS,
                           connect_timeout=10)


def execute(dsn: str, *statements: str | sql.Composable,
            params: Sequence[Any] | None = None) -> None:
    """Run `statements` in one transaction on `dsn`."""
    with connect(dsn, autocommit=False) as conn:
        for stmt in statements:
            conn.execute(stmt, params)  # type: ignore[arg-type]
        conn.commit()


def scalar(dsn: str, query: str | sql.Composable, params: Sequence[Any] | None = None) -> Any:
    with connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


# -- settings ------------------------------------------------------------------------------

def settings_dict(source_dsn: str, site_dsns: Sequence[str], *, name: str = "hq",
                  slot: str | None = None, tables: Sequence[str] | None = None,
                  site_names: Sequence[str] | None = None) -> dict[str, Any]:
    """A configuration as a dict; the slot defaults to one unique to the source database
    (slots are per cluster, databases are per test)."""
    slot = slot or f"s_{dbname(source_dsn)}".lower()
    source: dict[str, Any] = {"name": name, "dsn": source_dsn, "slot": slot,
                              "publication": f"p_{slot}"}
    if tables is not None:
        source["tables"] = list(tables)
    names = list(site_names) if site_names else [f"site{i + 1}" for i in range(len(site_dsns))]
    return {"source": source,
            "sites": [{"name": n, "dsn": d} for n, d in zip(names, site_dsns, strict=True)]}


def make_settings(source_dsn: str, site_dsns: Sequence[str], **kwargs: Any) -> Settings:
    return settings_from_dict(settings_dict(source_dsn, site_dsns, **kwargs))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(name: str, table: Mapping[str, Any]) -> list[str]:
    """`[name]` with its scalar keys, then its sub-tables as `[name."key"]` (recursively)."""
    lines = ["", f"[{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()
              if not isinstance(v, Mapping)]
    for k, v in table.items():
        if isinstance(v, Mapping):
            lines += _toml_table(f"{name}.{json.dumps(k)}", v)
    return lines


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    """Write `data` ({"source": {...}, "sites": [{...}], other sections: {...}}) as a TOML
    file; nested dicts become sub-tables (`[conflicts."tables"."public.t"]`)."""
    lines = ["[source]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data["source"].items()]
    for site in data["sites"]:
        lines += ["", "[[sites]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in site.items()]
    for section, table in data.items():
        if section not in ("source", "sites"):
            lines += _toml_table(section, table)
    path.write_text("\n".join(lines) + "\n")
    return path


# -- running the replicator ----------------------------------------------------------------

class PipelineThread:
    """A `Pipeline` running in a thread; `error` holds what `run()` raised, if anything."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.pipeline = Pipeline(settings, **kwargs)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-pipeline", daemon=True)

    def _run(self) -> None:
        try:
            self.pipeline.run()
        except BaseException as exc:
            self.error = exc

    def start(self) -> PipelineThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self.pipeline.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the pipeline did not stop"
        if self.error is not None:
            raise AssertionError(f"the pipeline failed: {self.error!r}") from self.error


@contextlib.contextmanager
def running_pipeline(settings: Settings, **kwargs: Any) -> Iterator[Pipeline]:
    """Run a `Pipeline` in a thread for the duration of the block; stop and join it after."""
    runner = PipelineThread(settings, **kwargs).start()
    try:
        yield runner.pipeline
    finally:
        runner.stop()


class CliProcess:
    """`python -m cdc_sync run -c FILE` as a subprocess (output to files next to FILE)."""

    def __init__(self, config: Path, *args: str, tag: str = "run") -> None:
        self.config = config
        self.args = args
        self.tag = tag
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CliProcess:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        base = self.config.with_name(f"{self.config.stem}.{self.tag}{self.starts}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdc_sync", *self.args, "run", "-c", str(self.config)],
                stdout=out, stderr=err, env=env, cwd=str(REPO_ROOT))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        base = self.config.with_name(f"{self.config.stem}.{self.tag}{self.starts}")
        try:
            return Path(f"{base}.err").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.kill()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "cdc_sync", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT), check=False)


# -- waiting -------------------------------------------------------------------------------

def current_lsn(dsn: str) -> Lsn:
    return Lsn.parse(str(scalar(dsn, "SELECT pg_current_wal_lsn()::text")))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_streaming(settings: Settings, timeout: float = 30) -> None:
    """Wait until a replicator holds the slot (it is past start-up and streaming)."""
    def active() -> bool:
        row = slot_row(settings.source.dsn, settings.source.slot)
        return row is not None and bool(row["active"])
    wait_for(active, timeout, f"slot {settings.source.slot} to be active")


def site_applied(settings: Settings) -> dict[str, Lsn | None]:
    """Each site's applied LSN as `commands.status` reports it."""
    st = commands.status(settings)
    return {s["name"]: Lsn.parse(s["applied_lsn"]) if s["applied_lsn"] else None
            for s in st["sites"]}


def sync_point(source_dsn: str) -> Lsn:
    """Commit a source transaction holding only a logical message and return the message's
    LSN: a site whose applied LSN is beyond it holds every transaction committed before."""
    value = scalar(source_dsn,
                   "SELECT pg_logical_emit_message(true, 'cdc_sync_test', 'sync')::text")
    return Lsn.parse(str(value))


def wait_until_caught_up(settings: Settings, timeout: float = 30, *,
                         pipeline: Pipeline | None = None) -> Lsn:
    """Wait until every site holds every transaction committed on the source before this call.

    A marker transaction is committed on the source (`sync_point`); the sites are caught up
    when their applied LSN (`commands.status`, or the workers' `durable_lsn` when `pipeline`
    is given) is past it. Returns the marker's LSN.

    (Waiting for `pg_current_wal_lsn()` instead would also wait for WAL that belongs to no
    published transaction, which sites only pass on keepalives; that is tested on its own.)
    """
    target = sync_point(settings.source.dsn)
    last: dict[str, Any] = {}

    def done() -> bool:
        if pipeline is not None:
            positions = {w.site: w.durable_lsn for w in pipeline.workers}
        else:
            positions = dict(site_applied(settings))
        last.update(positions)
        return all(p is not None and p > target for p in positions.values())

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            state = ""
            if pipeline is not None:
                state = "; workers: " + ", ".join(
                    f"{w.site}(connected={w.connected}, accepting={w.accepting}, "
                    f"queued={w.queue.qsize()}, error={w.last_error!r})"
                    for w in pipeline.workers) + f"; stream error: {pipeline.last_error!r}"
            raise AssertionError(f"sites not caught up with {target} after {timeout} s: "
                                 f"{ {k: str(v) for k, v in last.items()} }{state}")
        time.sleep(0.05)
    return target


def wait_until_idle_caught_up(settings: Settings, timeout: float = 30) -> None:
    """`commands.status` shows lag_bytes 0 for every site."""
    wait_for(lambda: all(s["lag_bytes"] == 0 for s in commands.status(settings)["sites"]),
             timeout, "lag_bytes 0 on every site", interval=0.2)


# -- comparing -------------------------------------------------------------------------------

def qualified(table: str) -> sql.Composable:
    """`schema.table` (split at the first dot) or an already composed identifier."""
    schema, _, name = table.partition(".")
    return sql.Identifier(schema, name) if name else sql.Identifier(schema)


def table_fingerprint(dsn: str, table: str | sql.Composable,
                      columns: Sequence[str] | None = None) -> list[str]:
    """Every row of `table` as text, sorted (duplicates kept): equal lists = equal tables."""
    ident = qualified(table) if isinstance(table, str) else table
    if columns is None:
        query = sql.SQL("SELECT t::text FROM {} AS t ORDER BY 1").format(ident)
    else:
        query = sql.SQL("SELECT ROW({})::text FROM {} AS t ORDER BY 1").format(
            sql.SQL(", ").join(sql.Identifier("t", c) for c in columns), ident)
    with connect(dsn) as conn:
        return [r[0] for r in conn.execute(query).fetchall()]


def user_tables(dsn: str) -> list[str]:
    """`schema.table` of every ordinary table outside the system and `cdc_sync` schemas."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
            "AND n.nspname NOT IN ('cdc_sync', 'pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%%' ORDER BY 1, 2").fetchall()
    return [f"{s}.{t}" for s, t in rows]


def assert_same_tables(source_dsn: str, site_dsns: Sequence[str],
                       tables: Sequence[str] | None = None, *, min_rows: int = 0) -> None:
    """Every table (default: all of the source's) has the same rows on every site."""
    tables = list(tables) if tables is not None else user_tables(source_dsn)
    assert tables, "no tables to compare"
    for table in tables:
        expected = table_fingerprint(source_dsn, table)
        assert len(expected) >= min_rows, f"{table}: only {len(expected)} rows on the source"
        for site in site_dsns:
            got = table_fingerprint(site, table)
            if got != expected:
                raise AssertionError(
                    f"{table} differs on {dbname(site)}: {len(got)} rows vs {len(expected)} "
                    f"on the source; only on the site: {sorted(set(got) - set(expected))[:5]}, "
                    f"only on the source: {sorted(set(expected) - set(got))[:5]}")


def slot_row(dsn: str, slot: str) -> dict[str, Any] | None:
    with connect(dsn) as conn:
        cur = conn.execute(
            "SELECT slot_name, active, active_pid, confirmed_flush_lsn::text "
            "FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        row = cur.fetchone()
    if row is None:
        return None
    return dict(zip(("slot_name", "active", "active_pid", "confirmed_flush_lsn"), row,
                    strict=True))


def progress_lsn(site_dsn: str, source: str) -> Lsn | None:
    value = scalar(site_dsn, "SELECT applied_lsn::text FROM cdc_sync.progress WHERE source = %s",
                   (source,))
    return Lsn.parse(value) if value else None


@contextlib.contextmanager
def replicating(settings: Settings, **kwargs: Any) -> Iterator[Pipeline]:
    """`commands.init(settings)`, then a running pipeline for the duration of the block."""
    commands.init(settings)
    with running_pipeline(settings, **kwargs) as pipeline:
        yield pipeline


def assert_converged(settings: Settings, pipeline: Pipeline | None = None,
                     tables: Sequence[str] | None = None, *, timeout: float = 30,
                     min_rows: int = 0) -> None:
    """Wait until every site has caught up, then compare every table with the source."""
    wait_until_caught_up(settings, timeout, pipeline=pipeline)
    assert_same_tables(settings.source.dsn, [s.dsn for s in settings.sites], tables,
                       min_rows=min_rows)

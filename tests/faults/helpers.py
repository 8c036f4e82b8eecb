"""Helpers of the fault suite (the shared ones are in `tests/integration/helpers.py`)."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from integration.helpers import REPO_ROOT, connect

PASSWORD = "secretpw"


def with_password(dsn: str, password: str = PASSWORD) -> str:
    """`postgresql://user@host:port/db` with `password` added to the user part."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class CliResult(subprocess.CompletedProcess[str]):
    """A finished `python -m cdc_sync` run; `elapsed`: seconds from its start to its exit."""

    elapsed: float = 0.0


def cli_many(commands: Sequence[Sequence[str]], *, env: Mapping[str, str] | None = None,
             timeout: float = 120) -> list[CliResult]:
    """Run several `python -m cdc_sync ARGS…` at once (each start-up costs a second or more of
    imports); their results in the order given."""
    results: list[CliResult | None] = [None] * len(commands)

    def one(i: int, args: Sequence[str]) -> None:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "cdc_sync", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env(env), cwd=str(REPO_ROOT))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        result = CliResult(list(args), proc.returncode, out, err)
        result.elapsed = time.monotonic() - started
        results[i] = result

    threads = [threading.Thread(target=one, args=(i, args), daemon=True)
               for i, args in enumerate(commands)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    assert all(r is not None for r in results), "a CLI run did not finish"
    return [r for r in results if r is not None]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Non-zero exit, exactly one line on stderr containing every `expected`, no traceback,
    no password; the line."""
    what = f"{' '.join(proc.args)}: rc={proc.returncode} stdout={proc.stdout!r} " \
           f"stderr={proc.stderr!r}"
    assert proc.returncode not in (0, None), what
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, what
    assert PASSWORD not in proc.stderr and PASSWORD not in proc.stdout, what
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, what
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


# -- servers --------------------------------------------------------------------------------

def terminate(dsn: str, where: str, params: Sequence[Any] = ()) -> int:
    """`pg_terminate_backend` every backend of `pg_stat_activity` matching `where`; how many."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "  # noqa: S608 - test SQL
            f"WHERE pid <> pg_backend_pid() AND ({where})", params).fetchall()
    return sum(1 for (ok,) in rows if ok)


def terminate_walsenders(dsn: str) -> int:
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_replication").fetchall()
    return sum(1 for (ok,) in rows if ok)


def rss_kib(pid: int) -> int:
    """VmRSS of process `pid` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# -- load -----------------------------------------------------------------------------------

class Writer(threading.Thread):
    """Calls `step(conn, i)` in its own transaction, i = 1, 2, … (a new i for every attempt),
    until `stop()` or `limit` steps committed; a lost connection (a restarted server) is
    reopened and a new step tried. `committed` counts the steps known to be committed (one
    interrupted at its commit may be committed too: compare with the source, not with this);
    any other error ends the thread (`error`)."""

    def __init__(self, dsn: str, step: Callable[[psycopg.Connection[Any], int], None], *,
                 limit: int | None = None, pause: float = 0.0) -> None:
        super().__init__(name="test-writer", daemon=True)
        self.dsn = dsn
        self.step = step
        self.limit = limit
        self.pause = pause
        self.committed = 0
        self.attempts = 0
        self.reconnects = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self, timeout: float = 60) -> None:
        self._stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer did not stop"
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}") from self.error

    def wait_for(self, steps: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.committed < steps:
            assert self.error is None, f"the writer failed: {self.error!r}"
            assert time.monotonic() < deadline, f"only {self.committed} of {steps} steps"
            time.sleep(0.05)

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop_event.is_set():
                if self.limit is not None and self.committed >= self.limit:
                    return
                try:
                    if conn is None or conn.closed:
                        conn = connect(self.dsn)
                    self.attempts += 1
                    with conn.transaction():
                        self.step(conn, self.attempts)
                    self.committed += 1
                except psycopg.OperationalError:
                    # The server went away: reconnect and go on with the next step.
                    self.reconnects += 1
                    with contextlib.suppress(Exception):
                        if conn is not None:
                            conn.close()
                    conn = None
                    self._stop_event.wait(0.2)
                    continue
                if self.pause:
                    self._stop_event.wait(self.pause)
        except BaseException as exc:
            self.error = exc
        finally:
            if conn is not None:
                conn.close()


# -- counting statements ----------------------------------------------------------------------

@contextlib.contextmanager
def statements_per_thread() -> Iterator[collections.Counter[str]]:
    """Count the statements each thread sends through psycopg (cursor `execute`, each row of
    `executemany`, `copy`) while the block runs: thread name -> count."""
    counts: collections.Counter[str] = collections.Counter()
    cursor = psycopg.Cursor
    orig_execute, orig_many, orig_copy = cursor.execute, cursor.executemany, cursor.copy

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts[threading.current_thread().name] += 1
        return orig_execute(self, *args, **kwargs)

    def executemany(self: Any, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        params_seq = list(params_seq)
        counts[threading.current_thread().name] += len(params_seq)
        return orig_many(self, query, params_seq, **kwargs)

    def copy(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts[threading.current_thread().name] += 1
        return orig_copy(self, *args, **kwargs)

    cursor.execute = execute  # type: ignore[method-assign]
    cursor.executemany = executemany  # type: ignore[method-assign]
    cursor.copy = copy  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        cursor.execute = orig_execute  # type: ignore[method-assign]
        cursor.executemany = orig_many  # type: ignore[method-assign]
        cursor.copy = orig_copy  # type: ignore[method-assign]

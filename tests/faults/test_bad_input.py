"""Bad input: every mistake a user can make ends `cdc-sync` with a non-zero exit status and one
line on stderr saying what and where, no traceback, and never a password.

The CLI runs as a subprocess (`python -m cdc_sync`). Many DSNs carry the password `secretpw`
(trust authentication ignores it) and every check asserts it appears nowhere in the output.

The busy-slot case needs ~35 s (the pipeline retries a busy slot for 30 s before giving up), so
it is started in the background by a module fixture and collected by the last test, while the
other cases run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from integration.helpers import (
    CliProcess,
    execute,
    make_settings,
    run_cli,
    settings_dict,
    slot_row,
    wait_for,
    write_config,
)

from cdc_sync import commands
from cdc_sync.embedded import Cluster, default_server

from .helpers import PASSWORD, assert_one_line_error, cli_many, with_password

GOOD_TABLE = "CREATE TABLE t (id int PRIMARY KEY, amount numeric, note text)"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(path: Path, source: str, sites: list[str], **kwargs: object) -> Path:
    return write_config(path, settings_dict(source, sites, **kwargs))  # type: ignore[arg-type]


# -- the configuration file --------------------------------------------------------------------

VALID = """\
[source]
name = "hq"
dsn = "postgresql://app:secretpw@127.0.0.1:5999/db"

[[sites]]
name = "berlin"
dsn = "postgresql://app:secretpw@127.0.0.1:5999/berlin"
"""


def test_config_file_errors(tmp_path: Path) -> None:
    """Missing, unreadable, bad TOML, unknown key, missing ${VAR}, bad DSN: each one line
    naming the file and the key or line."""
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "syntax.toml").write_text(VALID.replace('name = "berlin"', 'name = berlin'))
    (tmp_path / "unknown.toml").write_text(VALID.replace('name = "berlin"', 'nmae = "berlin"'))
    (tmp_path / "var.toml").write_text(VALID.replace("secretpw@", "${CDC_TEST_UNSET_PW}@", 1))
    (tmp_path / "dsn.toml").write_text(VALID.replace(
        '"postgresql://app:secretpw@127.0.0.1:5999/db"',
        '"host=127.0.0.1 password=secretpw no_such_option=1"'))
    cases: list[tuple[str, list[str]]] = [
        ("missing.toml", ["config file not found", str(tmp_path / "missing.toml")]),
        ("dir.toml", ["cannot read config file", str(tmp_path / "dir.toml")]),
        ("syntax.toml", ["syntax.toml", "line 6", "invalid TOML"]),
        ("unknown.toml", ["unknown.toml", "sites[0].nmae", "unknown key", '"name"']),
        ("var.toml", ["var.toml", "source.dsn", "CDC_TEST_UNSET_PW", "not set"]),
        ("dsn.toml", ["dsn.toml", "source.dsn", "not a valid PostgreSQL connection string"]),
    ]
    unreadable = tmp_path / "unreadable.toml"
    unreadable.write_text(VALID)
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # (root reads anything)
        cases.append(("unreadable.toml", ["cannot read config file", "unreadable.toml",
                                          "permission denied"]))
    env = {k: v for k, v in os.environ.items() if k != "CDC_TEST_UNSET_PW"}
    env["CDC_SYNC_CONFIG"] = str(tmp_path / "nope.toml")  # for the one run without -c
    results = cli_many([["init", "-c", str(tmp_path / name)] for name, _ in cases]
                       + [["status"]], env=env)
    for (_name, expected), proc in zip(cases, results, strict=False):
        assert_one_line_error(proc, *expected)
    assert_one_line_error(results[-1], "config file not found", str(tmp_path / "nope.toml"))


# -- connecting ----------------------------------------------------------------------------------

def test_unreachable_source_names_host_and_port_quickly(tmp_path: Path) -> None:
    port = _closed_port()
    source = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/db"
    config = _config(tmp_path / "c.toml", source, [source.replace("/db", "/site")])
    # Timed against a run that fails without connecting (a missing file) started alongside,
    # so a loaded machine's slow start-up does not count.
    results = cli_many([[cmd, "-c", str(config)] for cmd in ("init", "run", "status")]
                       + [["init", "-c", str(tmp_path / "missing.toml")]])
    baseline = results[-1].elapsed
    for proc in results[:-1]:
        assert_one_line_error(proc, f"127.0.0.1:{port}", "source")
        extra = proc.elapsed - baseline
        assert extra < 10, f"{proc.args[0]}: {extra:.1f} s to report an unreachable source"


def test_unreachable_site_is_named(new_db: Callable[..., str], tmp_path: Path) -> None:
    source = new_db("src")
    execute(source, GOOD_TABLE)
    port = _closed_port()
    site = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/site"
    config = _config(tmp_path / "c.toml", with_password(source), [site])
    line = assert_one_line_error(run_cli("init", "-c", str(config)), f"127.0.0.1:{port}")
    assert "site" in line


def test_database_that_does_not_exist(new_db: Callable[..., str], tmp_path: Path) -> None:
    source = new_db("src")
    execute(source, GOOD_TABLE)
    base = with_password(source).rsplit("/", 1)[0]
    missing_source = _config(tmp_path / "a.toml", f"{base}/no_such_src", [f"{base}/whatever"],
                             slot="s_missing")
    missing_site = _config(tmp_path / "b.toml", with_password(source), [f"{base}/no_such_site"])
    first, second = cli_many([["init", "-c", str(missing_source)],
                              ["init", "-c", str(missing_site)]])
    assert_one_line_error(first, "no_such_src", "does not exist")
    assert_one_line_error(second, "no_such_site", "does not exist")


@dataclass
class StrictServer:
    """A separate server with `wal_level = replica` where role `pwuser` must give a password."""

    cluster: Cluster
    user_dsn: str  # pwuser with a wrong password


@pytest.fixture(scope="module")
def strict_server(cluster_base_dir: Path | None) -> Iterator[StrictServer]:
    with Cluster.create(cluster_base_dir, binaries=default_server(),
                        settings={"wal_level": "replica"}) as server:
        hba = server.datadir / "pg_hba.conf"
        hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        execute(server.dsn(), "CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD 'the-right-one'")
        execute(server.dsn(), "SELECT pg_reload_conf()")
        yield StrictServer(server, with_password(server.dsn(user="pwuser")))


def test_failed_authentication(strict_server: StrictServer, fault_cluster: Cluster,
                               tmp_path: Path) -> None:
    site = with_password(fault_cluster.dsn())
    server = strict_server.cluster
    kv = (f"host=127.0.0.1 port={server.port} dbname=postgres user=pwuser "
          f"password={PASSWORD}")
    ghost = with_password(fault_cluster.dsn(user="nobody_here"))
    configs = [_config(tmp_path / "url.toml", strict_server.user_dsn, [site], slot="s_auth"),
               _config(tmp_path / "kv.toml", kv, [site], slot="s_auth"),
               _config(tmp_path / "ghost.toml", ghost, [site], slot="s_auth")]
    url, keyvalue, no_role = cli_many([["init", "-c", str(c)] for c in configs])
    for proc in (url, keyvalue):
        assert_one_line_error(proc, f"127.0.0.1:{server.port}", "password authentication failed",
                              "pwuser")
    assert_one_line_error(no_role, f"127.0.0.1:{fault_cluster.port}", "nobody_here",
                          "does not exist")


def test_wal_level_not_logical(strict_server: StrictServer, fault_cluster: Cluster,
                               tmp_path: Path) -> None:
    server = strict_server.cluster
    execute(server.dsn(), "CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
    config = _config(tmp_path / "c.toml", with_password(server.dsn()),
                     [with_password(fault_cluster.dsn())], slot="s_wal")
    assert_one_line_error(run_cli("init", "-c", str(config)),
                          "wal_level", "replica", "logical", "ALTER SYSTEM SET wal_level")


# -- the source's and the sites' tables ------------------------------------------------------------

def test_table_without_replica_identity(new_db: Callable[..., str], tmp_path: Path) -> None:
    source, site = new_db("src"), new_db("site")
    execute(source, GOOD_TABLE, 'CREATE TABLE "Audit Log" (at timestamptz, msg text)')
    config = _config(tmp_path / "c.toml", with_password(source), [with_password(site)])
    line = assert_one_line_error(run_cli("init", "-c", str(config)),
                                 "public.Audit Log", "REPLICA IDENTITY FULL")
    fix = line[line.index("ALTER TABLE"):]
    execute(source, fix)  # the suggested statement is the fix
    assert commands.init(make_settings(source, [site])).tables == ["public.Audit Log", "public.t"]


def test_site_table_missing_a_source_column(new_db: Callable[..., str], tmp_path: Path) -> None:
    source, site = new_db("src"), new_db("site")
    execute(source, GOOD_TABLE)
    execute(site, "CREATE TABLE t (id int PRIMARY KEY, note text)")
    config = _config(tmp_path / "c.toml", with_password(source), [with_password(site)])
    proc = run_cli("init", "-c", str(config))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    assert "public.t.amount" in errors[0] and "site1" in errors[0]


def test_an_init_error_after_migrating_is_the_only_line_on_stderr(
        new_db: Callable[..., str], tmp_path: Path) -> None:
    source, site = new_db("src"), new_db("site")
    execute(source, GOOD_TABLE)
    execute(site, "CREATE TABLE t (id int PRIMARY KEY, note text)")
    config = _config(tmp_path / "c.toml", source, [site])
    assert_one_line_error(run_cli("init", "-c", str(config)), "public.t.amount")


# -- a slot another process streams from --------------------------------------------------------

@dataclass
class BusySlot:
    slot: str
    holder: CliProcess
    second: CliProcess
    started: float  # time.time()


@pytest.fixture(scope="module", autouse=True)
def busy_slot(fault_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory,
              databases_on: Callable[[Cluster], AbstractContextManager[Callable[..., str]]],
              ) -> Iterator[BusySlot]:
    """A `cdc-sync run` streaming from its slot, and a second one started on the same slot
    (started first thing in the module: it takes ~35 s to give up)."""
    with databases_on(fault_cluster) as new_db:
        source, site = new_db("busy_src"), new_db("busy_site")
        holder = second = None
        try:
            execute(source, GOOD_TABLE)
            data = settings_dict(with_password(source), [with_password(site)])
            config = write_config(tmp_path_factory.mktemp("busy") / "c.toml", data)
            commands.init(make_settings(source, [site]))
            holder = CliProcess(config, tag="holder").start()
            slot = data["source"]["slot"]
            wait_for(lambda: bool((slot_row(source, slot) or {}).get("active")), 30,
                     "the first `cdc-sync run` to hold the slot")
            second = CliProcess(config, tag="second").start()
            yield BusySlot(slot, holder, second, time.time())
        finally:
            for proc in (second, holder):
                if proc is not None:
                    proc.kill()


def test_slot_in_use_by_another_process(busy_slot: BusySlot) -> None:
    second = busy_slot.second
    assert second.proc is not None
    rc = second.proc.wait(timeout=max(1.0, busy_slot.started + 120 - time.time()))
    stderr = second.stderr()
    assert rc != 0, stderr
    # It waits 30 s for a slot that may be about to be released (a previous run's WAL
    # sender still exiting), then gives up. Timed from its first look at the slot (its first
    # log line) to its last line: start-up on a loaded machine does not count.
    err_file = second.config.with_name(f"{second.config.stem}.{second.tag}1.err")
    ended = err_file.stat().st_mtime
    first_seen = datetime.strptime(stderr[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert "in use" in stderr.splitlines()[0], stderr
    assert 25 < ended - first_seen < 40, f"gave up after {ended - first_seen:.0f} s: {stderr}"
    assert "Traceback" not in stderr and PASSWORD not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and busy_slot.slot in last and "in use" in last, stderr
    # the first one was not disturbed
    assert busy_slot.holder.alive()
    assert PASSWORD not in busy_slot.holder.stderr()

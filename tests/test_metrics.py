"""Prometheus metrics: the collector's arithmetic on a stand-in pipeline, a real pipeline
scraped over HTTP, and `cdc-sync run --metrics-port` as a process."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from integration.helpers import (
    REPO_ROOT,
    execute,
    make_settings,
    replicating,
    settings_dict,
    wait_for,
    wait_until_caught_up,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

from cdc_sync import commands
from cdc_sync.config import settings_from_dict
from cdc_sync.metrics import Metrics, PipelineCollector, serve_metrics
from cdc_sync.protocol import Lsn

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """`{(sample name, sorted labels): value}` of an exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def site(name: str) -> tuple[tuple[str, str], ...]:
    return (("site", name),)


# -- the collector on a stand-in pipeline ------------------------------------------------------

class _Queue:
    def __init__(self, n: int) -> None:
        self.n = n

    def qsize(self) -> int:
        return self.n


@dataclass
class FakeWorker:
    site: str
    durable_lsn: Lsn | None
    last_commit_ts: datetime | None = None
    applied_changes: int = 0
    conflicts: int = 0
    dead_letters: int = 0
    connected: bool = True
    accepting: bool = True
    queue: _Queue = field(default_factory=lambda: _Queue(0))


@dataclass
class FakePipeline:
    workers: list[FakeWorker]
    received_lsn: Lsn = Lsn(1000)
    connected: bool = True
    retained_bytes: int | None = None


NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def collect(pipe: FakePipeline, connectors: Any = None) -> Samples:
    metrics = Metrics()
    collector = PipelineCollector(cast(Any, pipe), connectors, clock=lambda: NOW)
    metrics.registry.register(collector)
    from prometheus_client import generate_latest
    return parse(generate_latest(metrics.registry).decode())


def test_collector_lag_and_counters() -> None:
    pipe = FakePipeline(workers=[
        # holds everything: lag 0
        FakeWorker("idle", Lsn(1000), NOW - timedelta(hours=1), applied_changes=12,
                   conflicts=2, dead_letters=1),
        # behind with work queued: lag = now - last commit
        FakeWorker("busy", Lsn(600), NOW - timedelta(seconds=7.5), queue=_Queue(3)),
        # behind only by WAL of no transaction, nothing queued: 0 seconds
        FakeWorker("tail", Lsn(960), NOW - timedelta(hours=2)),
        # no position yet: seconds unknown
        FakeWorker("new", None, connected=False),
    ], retained_bytes=4096)
    s = collect(pipe)
    assert s[("cdc_sync_site_lag_bytes", site("idle"))] == 0
    assert s[("cdc_sync_site_lag_seconds", site("idle"))] == 0
    assert s[("cdc_sync_site_lag_bytes", site("busy"))] == 400
    assert s[("cdc_sync_site_lag_seconds", site("busy"))] == 7.5
    assert s[("cdc_sync_site_lag_bytes", site("tail"))] == 40
    assert s[("cdc_sync_site_lag_seconds", site("tail"))] == 0
    assert s[("cdc_sync_site_lag_bytes", site("new"))] == 1000
    assert math.isnan(s[("cdc_sync_site_lag_seconds", site("new"))])
    assert s[("cdc_sync_changes_applied_total", site("idle"))] == 12
    assert s[("cdc_sync_conflicts_total", site("idle"))] == 2
    assert s[("cdc_sync_dead_letters_total", site("idle"))] == 1
    assert s[("cdc_sync_site_up", site("idle"))] == 1
    assert s[("cdc_sync_site_up", site("new"))] == 0
    assert s[("cdc_sync_source_up", ())] == 1
    assert s[("cdc_sync_slot_retained_bytes", ())] == 4096


def test_collector_disconnected_site_is_lagging() -> None:
    pipe = FakePipeline(workers=[FakeWorker("down", Lsn(900), NOW - timedelta(seconds=30),
                                            connected=False)])
    s = collect(pipe)
    assert s[("cdc_sync_site_lag_seconds", site("down"))] == 30
    assert s[("cdc_sync_site_up", site("down"))] == 0


def test_collector_connectors_and_unknown_retention(caplog: pytest.LogCaptureFixture) -> None:
    pipe = FakePipeline(workers=[FakeWorker("a", Lsn(1000))])
    s = collect(pipe, lambda: [{"name": "audit", "backlog": 17}, {"name": "crm", "backlog": 0}])
    assert s[("cdc_sync_connector_backlog", (("connector", "audit"),))] == 17
    assert s[("cdc_sync_connector_backlog", (("connector", "crm"),))] == 0
    assert not any(name == "cdc_sync_slot_retained_bytes" for name, _ in s)

    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("outbox site unreachable")

    s = collect(pipe, broken)  # the scrape still works
    assert s[("cdc_sync_site_up", site("a"))] == 1
    assert not any(name == "cdc_sync_connector_backlog" for name, _ in s)
    assert "outbox site unreachable" in caplog.text


def test_histogram_is_fed_by_on_applied() -> None:
    metrics = Metrics()
    worker = cast(Any, FakeWorker("berlin", Lsn(1)))
    for seconds in (0.002, 0.03, 0.4):
        metrics.on_applied(worker, 10, seconds)
    from prometheus_client import generate_latest
    s = parse(generate_latest(metrics.registry).decode())
    assert s[("cdc_sync_apply_batch_seconds_count", site("berlin"))] == 3
    assert s[("cdc_sync_apply_batch_seconds_sum", site("berlin"))] == pytest.approx(0.432)
    assert s[("cdc_sync_apply_batch_seconds_bucket", (("le", "0.05"), ("site", "berlin")))] == 2


# -- a real pipeline ---------------------------------------------------------------------------

def test_scrape_a_running_pipeline(make_db: Callable[..., str]) -> None:
    source, site_a, site_b = make_db("src"), make_db("site_a"), make_db("site_b")
    execute(source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    data = settings_dict(source, [site_a, site_b])
    data["source"]["heartbeat_seconds"] = 1  # an idle source moves on sooner
    settings = settings_from_dict(data)
    metrics = Metrics()
    with replicating(settings, on_applied=metrics.on_applied) as pipe:
        server = serve_metrics(pipe, 0, metrics=metrics)
        try:
            assert server.url == f"http://127.0.0.1:{server.port}/metrics"
            execute(source, "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 40) g")
            execute(source, "UPDATE t SET v = 'w' WHERE id <= 10")
            execute(source, "DELETE FROM t WHERE id > 35")
            wait_until_caught_up(settings, pipeline=pipe)
            s = scrape(server.url)
            for name in ("site1", "site2"):
                assert s[("cdc_sync_changes_applied_total", site(name))] == 55
                assert s[("cdc_sync_site_up", site(name))] == 1
                assert s[("cdc_sync_dead_letters_total", site(name))] == 0
                assert s[("cdc_sync_conflicts_total", site(name))] == 0
                assert s[("cdc_sync_apply_batch_seconds_count", site(name))] >= 1
                assert s[("cdc_sync_apply_batch_seconds_sum", site(name))] > 0
            assert s[("cdc_sync_source_up", ())] == 1

            # Caught up and idle: lag 0 within a few keepalives.
            def idle() -> bool:
                now = scrape(server.url)
                return all(now[(f"cdc_sync_site_lag_{unit}", site(n))] == 0
                           for n in ("site1", "site2") for unit in ("bytes", "seconds"))

            wait_for(idle, 20, "lag 0 on both sites", interval=0.3)
        finally:
            server.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url, timeout=2)


# -- the command ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_metrics_port(make_db: Callable[..., str], tmp_path: Path) -> None:
    source, site_a = make_db("src"), make_db("site")
    execute(source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    config = write_config(tmp_path / "c.toml", settings_dict(source, [site_a]))
    settings = make_settings(source, [site_a])
    commands.init(settings)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    err_path = tmp_path / "run.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdc_sync", "--log-format", "json", "run", "-c", str(config),
             "--metrics-port", str(port)], stdout=subprocess.DEVNULL, stderr=err, env=env,
            cwd=str(REPO_ROOT))
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def serving() -> bool:
            assert proc.poll() is None, err_path.read_text()
            try:
                return ("cdc_sync_site_up", site("site1")) in scrape(url)
            except httpx.TransportError:
                return False

        wait_for(serving, 60, "the metrics endpoint", interval=0.2)
        execute(source, "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 7) g")
        wait_until_caught_up(settings)
        wait_for(lambda: scrape(url)[("cdc_sync_changes_applied_total", site("site1"))] == 7,
                 10, "7 changes applied")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, err_path.read_text()
    logs = err_path.read_text().splitlines()
    assert logs and all(line.startswith("{") for line in logs), logs[:3]  # --log-format json
    assert any("serving metrics on 127.0.0.1" in line for line in logs)
    time.sleep(0.1)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_run_metrics_port_in_use(tmp_path: Path) -> None:
    dsn = "postgresql://cdc@127.0.0.1:1/db"  # never reached: the port check comes first
    config = write_config(tmp_path / "c.toml", {"source": {"name": "hq", "dsn": dsn},
                                                "sites": [{"name": "s1", "dsn": dsn}]})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.run(
            [sys.executable, "-m", "cdc_sync", "run", "-c", str(config), "--metrics-port",
             str(port)], capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use" in lines[0]

"""Metrics of the bus path (issue 15, item 6): what `BusCollector` reads from a running capture
and applier, and `--metrics-port` on `cdc-sync capture` / `apply`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from integration.conftest import Env
from integration.helpers import execute, wait_for
from prometheus_client import generate_latest

from cdc_sync import commands
from cdc_sync.bus.applier import BusApplier
from cdc_sync.bus.capture import Capture
from cdc_sync.bus.client import BusClient
from cdc_sync.bus.metrics import BusCollector
from cdc_sync.metrics import Metrics

from .conftest import NatsServer
from .test_bus import bus_config, bus_settings, running, wait_applied


def _samples(metrics: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_the_collector_reads_capture_and_the_appliers(env: Env, nats_server: NatsServer) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = bus_settings(env, nats_server)
    commands.init(settings)
    metrics = Metrics()
    cap = Capture(settings)
    applier = BusApplier(settings, on_applied=metrics.on_applied)
    collector = BusCollector(cap, applier)
    metrics.bind_collector(collector)
    site1, site2 = (s.name for s in settings.sites)
    try:
        with running(cap), running(applier):
            execute(env.source, "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 300) g")
            wait_applied(settings)
            assert settings.bus is not None
            client = BusClient(settings.bus, settings.source.name)
            client.connect()
            client._run(client._js.publish(client.subject, b"not ours"))
            client.close()
            execute(env.source, "INSERT INTO t VALUES (1000, 'late')")
            wait_applied(settings)
            got = _samples(metrics)
    finally:
        collector.close()
    assert got["cdc_sync_source_up"] == 1 and got["cdc_sync_bus_up"] == 1
    assert got["cdc_sync_bus_published_chunks_total"] >= 2
    assert got["cdc_sync_capture_lag_bytes"] >= 0
    assert got["cdc_sync_slot_retained_bytes"] > 0
    for site in (site1, site2):
        assert got[f'cdc_sync_changes_applied_total{{site="{site}"}}'] == 301
        assert got[f'cdc_sync_site_up{{site="{site}"}}'] == 1
        assert got[f'cdc_sync_bus_bad_messages_total{{site="{site}"}}'] == 1
        assert got[f'cdc_sync_site_needs_resync{{site="{site}"}}'] == 0
        assert got[f'cdc_sync_site_lag_bytes{{site="{site}"}}'] == 0
        assert got[f'cdc_sync_apply_batch_seconds_count{{site="{site}"}}'] >= 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_capture_and_apply_serve_metrics(env: Env, nats_server: NatsServer,
                                         tmp_path: Path) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)")
    config, settings = bus_config(env, nats_server, tmp_path)
    commands.init(settings)
    ports = {"capture": _free_port(), "apply": _free_port()}
    log = (tmp_path / "cli.log").open("ab")
    procs = [subprocess.Popen([sys.executable, "-m", "cdc_sync", verb, "-c", str(config),
                               "--metrics-port", str(port)], stdout=log, stderr=log)
             for verb, port in ports.items()]
    try:
        execute(env.source, "INSERT INTO t SELECT generate_series(1, 10)")

        def applied() -> bool:
            try:
                return 'cdc_sync_changes_applied_total{site="site1"} 10.0' in _scrape(
                    ports["apply"])
            except OSError:
                return False

        wait_for(applied, 60, "the applier's metrics to show the rows")
        text = _scrape(ports["capture"])
        assert "cdc_sync_bus_up 1.0" in text and "cdc_sync_source_up 1.0" in text
        assert "cdc_sync_site_up" not in text  # capture has no sites
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(60) == 0

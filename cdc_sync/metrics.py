"""Prometheus metrics of a running `Pipeline` (`cdc-sync run --metrics-port N`).

Contract:
- Everything lives in a dedicated `CollectorRegistry` (never the process-global default), so
  several pipelines or tests in one process do not collide.
- `Metrics()` owns that registry and the histogram `cdc_sync_apply_batch_seconds{site}` (the
  time each target transaction took, observed by `Metrics.on_applied`, which is the
  `on_applied(worker, n_changes, seconds)` callback to give `Pipeline`).
- `Metrics.bind(pipeline, connectors=None)` registers a collector that reads the pipeline's
  state at scrape time (nothing is sampled in the background):

  - `cdc_sync_site_lag_bytes{site}` (gauge): `pipeline.received_lsn - worker.durable_lsn`,
    floored at 0;
  - `cdc_sync_site_lag_seconds{site}` (gauge): now − `worker.last_commit_ts` while the site
    is behind, else 0 (NaN while behind with no commit applied yet). "Behind" means the
    worker has no position yet, or it is below `received_lsn` while the worker has items
    queued, is disconnected or is detached (`site_lag`): a site that has applied everything
    it was sent is not behind because of WAL that belongs to no transaction (the position
    then catches up on the next keepalive), so the gauge does not jump to "time since the
    last write" on an idle or lightly loaded source;
  - `cdc_sync_changes_applied_total{site}`, `cdc_sync_conflicts_total{site}`,
    `cdc_sync_dead_letters_total{site}` (counters): the worker's `applied_changes`,
    `conflicts`, `dead_letters`;
  - `cdc_sync_site_up{site}` (gauge): 1 while the worker is connected to its site, else 0;
  - `cdc_sync_source_up` (gauge): 1 while the replication stream is connected;
  - `cdc_sync_slot_retained_bytes` (gauge): `pipeline.retained_bytes` (sampled every 30 s by
    the pipeline; absent until known);
  - `cdc_sync_connector_backlog{connector}` (gauge): from `connectors()` (e.g.
    `connector_status`), when given.

  Counters count since this process started. A `connectors()` call that fails is logged and
  its metric left out of that scrape; it never fails the scrape.
- `serve_metrics(pipeline, port, host="127.0.0.1", *, metrics=None, connectors=None)` binds
  (a new `Metrics` unless given) and serves `/metrics` over HTTP on a daemon thread
  (`prometheus_client.start_http_server`); it returns a `MetricsServer` with the bound `port`
  (useful with port 0) and `close()`. It listens on loopback by default: pass
  `host="0.0.0.0"` deliberately (a container) to expose it. `serve_registry(metrics, port,
  host)` serves a `Metrics` bound later (`bind_collector`: `cdc_sync.bus.metrics`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .pipeline import Pipeline
    from .sinks.worker import SiteWorker

__all__ = ["APPLY_BUCKETS", "Metrics", "MetricsServer", "PipelineCollector", "SiteFamilies",
           "serve_metrics", "serve_registry", "site_lag"]

log = logging.getLogger(__name__)

# Target transactions take from about a millisecond (one row) to seconds (a big group).
APPLY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0)

ConnectorStatus = Callable[[], Sequence[Mapping[str, Any]]]


def site_lag(received: int, worker: SiteWorker, now: datetime) -> tuple[int, float | None]:
    """`(lag_bytes, lag_seconds)` of `worker` given the pipeline's `received` LSN.

    `lag_seconds` is None while it is behind with no commit applied yet (see the module
    docstring for "behind")."""
    durable = worker.durable_lsn
    lag_bytes = max(0, received - int(durable or 0))
    behind = durable is None or (lag_bytes > 0 and (
        worker.queue.qsize() > 0 or not worker.connected or not worker.accepting))
    if not behind:
        return lag_bytes, 0.0
    if worker.last_commit_ts is None:
        return lag_bytes, None
    return lag_bytes, max(0.0, (now - worker.last_commit_ts).total_seconds())


class SiteFamilies:
    """The per-site metric families of one scrape, for the in-process pipeline and the bus
    appliers alike (`lag_bytes_help`: what the site's lag is measured from)."""

    def __init__(self, lag_bytes_help: str) -> None:
        labels = ["site"]
        self.lag_bytes = GaugeMetricFamily("cdc_sync_site_lag_bytes", lag_bytes_help,
                                           labels=labels)
        self.lag_seconds = GaugeMetricFamily(
            "cdc_sync_site_lag_seconds",
            "Age of the last source commit applied at the site while it is behind, else 0",
            labels=labels)
        self.applied = CounterMetricFamily("cdc_sync_changes_applied",
                                           "Row changes applied at the site", labels=labels)
        self.conflicts = CounterMetricFamily("cdc_sync_conflicts",
                                             "Conflicts resolved at the site", labels=labels)
        self.dead = CounterMetricFamily("cdc_sync_dead_letters",
                                        "Changes the site rejected and set aside", labels=labels)
        self.up = GaugeMetricFamily("cdc_sync_site_up", "1 while connected to the site",
                                    labels=labels)

    def add(self, worker: SiteWorker, received: int, now: datetime) -> None:
        """One site's samples, its lag measured from the `received` LSN (`site_lag`)."""
        site = [worker.site]
        behind_bytes, behind_seconds = site_lag(received, worker, now)
        self.lag_bytes.add_metric(site, float(behind_bytes))
        self.lag_seconds.add_metric(site, math.nan if behind_seconds is None else behind_seconds)
        self.applied.add_metric(site, float(worker.applied_changes))
        self.conflicts.add_metric(site, float(worker.conflicts))
        self.dead.add_metric(site, float(worker.dead_letters))
        self.up.add_metric(site, 1.0 if worker.connected else 0.0)

    def families(self) -> tuple[Metric, ...]:
        return (self.lag_bytes, self.lag_seconds, self.applied, self.conflicts, self.dead,
                self.up)


class PipelineCollector(Collector):
    """Reads `pipeline` (and `connectors()`) at each scrape; see the module docstring."""

    def __init__(self, pipeline: Pipeline, connectors: ConnectorStatus | None = None, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.pipeline = pipeline
        self.connectors = connectors
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        pipe = self.pipeline
        now = self.clock()
        sites = SiteFamilies("Bytes of source WAL received but not yet applied at the site")
        received = int(pipe.received_lsn)
        for w in pipe.workers:
            sites.add(w, received, now)
        yield from sites.families()
        yield GaugeMetricFamily("cdc_sync_source_up", "1 while the replication stream is connected",
                                value=1.0 if pipe.connected else 0.0)
        if pipe.retained_bytes is not None:
            yield GaugeMetricFamily("cdc_sync_slot_retained_bytes",
                                    "WAL bytes the replication slot holds back",
                                    value=float(pipe.retained_bytes))
        if self.connectors is not None:
            backlog = self._connector_backlog()
            if backlog is not None:
                yield backlog

    def _connector_backlog(self) -> GaugeMetricFamily | None:
        assert self.connectors is not None
        try:
            rows = self.connectors()
        except Exception as exc:  # a scrape must not fail because the outbox site is away
            log.warning("metrics: cannot read the connectors' state: %s", exc)
            return None
        family = GaugeMetricFamily("cdc_sync_connector_backlog",
                                   "Outbox events the connector has still to deliver",
                                   labels=["connector"])
        for row in rows:
            family.add_metric([str(row["name"])], float(row.get("backlog") or 0))
        return family


class Metrics:
    """The registry, the apply-latency histogram and the pipeline collector of one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.apply_batch_seconds = Histogram(
            "cdc_sync_apply_batch_seconds", "Seconds per target transaction applied at the site",
            ["site"], registry=self.registry, buckets=APPLY_BUCKETS)
        self._collector: Collector | None = None
        self._lock = threading.Lock()

    def on_applied(self, worker: SiteWorker, n_changes: int, seconds: float) -> None:
        """The `Pipeline(on_applied=...)` callback: one committed target transaction."""
        self.apply_batch_seconds.labels(worker.site).observe(max(0.0, seconds))

    def bind(self, pipeline: Pipeline, connectors: ConnectorStatus | None = None) -> None:
        """Expose `pipeline`'s state (once per `Metrics`)."""
        self.bind_collector(PipelineCollector(pipeline, connectors))

    def bind_collector(self, collector: Collector) -> None:
        """Expose what `collector` reads (the bus path's `BusCollector`; once per `Metrics`)."""
        with self._lock:
            if self._collector is not None:
                raise RuntimeError("Metrics is already bound to a pipeline")
            self._collector = collector
            self.registry.register(collector)


@dataclass
class MetricsServer:
    """A running `/metrics` endpoint."""

    server: WSGIServer
    thread: threading.Thread
    metrics: Metrics
    host: str

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(pipeline: Pipeline, port: int, host: str = "127.0.0.1", *,
                  metrics: Metrics | None = None,
                  connectors: ConnectorStatus | None = None) -> MetricsServer:
    """Serve `pipeline`'s metrics on `http://host:port/metrics` (see the module docstring).

    `OSError` (port in use, no such address) propagates; the CLI turns it into one line."""
    metrics = metrics if metrics is not None else Metrics()
    metrics.bind(pipeline, connectors)
    return serve_registry(metrics, port, host)


def serve_registry(metrics: Metrics, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve `metrics`' registry as it is and as it gets bound (`Metrics.bind_collector`)."""
    started = time.monotonic()
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("serving metrics on %s:%d/metrics (%.0f ms)", host, server.server_port,
             (time.monotonic() - started) * 1000)
    return MetricsServer(server=server, thread=thread, metrics=metrics, host=host)

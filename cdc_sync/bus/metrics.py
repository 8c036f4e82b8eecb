"""Prometheus metrics of `cdc-sync capture` / `apply` / `run` with `[bus]` (`--metrics-port`).

Contract: `BusCollector(capture, applier)` (either may be None: a process runs one or both)
reads their state at scrape time, like `cdc_sync.metrics.PipelineCollector`:

- capture: `cdc_sync_source_up` (1 while the replication stream is connected),
  `cdc_sync_bus_up` (1 while the bus connection is up), `cdc_sync_bus_published_chunks`
  (counter: chunks JetStream acknowledged), `cdc_sync_capture_lag_bytes` (WAL received from
  the source but not yet stored by JetStream, i.e. not yet confirmed to the slot) and
  `cdc_sync_slot_retained_bytes` (the slot's retained WAL, read from the source at most every
  `RETAINED_EVERY` seconds on the collector's own connection; absent while unknown);
- per site of the applier: `cdc_sync_site_lag_bytes{site}` (the end of the last transaction
  the site's feed read from the stream minus the site's durable position), `..._seconds`,
  `cdc_sync_changes_applied`, `cdc_sync_conflicts`, `cdc_sync_dead_letters`, `cdc_sync_site_up`
  exactly as in-process, plus `cdc_sync_bus_bad_messages{site}` (counter: stream messages not
  ours, dead-lettered) and `cdc_sync_site_needs_resync{site}` (1 while the stream no longer holds
  what the site needs).

`cdc_sync_apply_batch_seconds{site}` comes from `Metrics.on_applied`, given to the applier.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..metrics import SiteFamilies
from ..source.monitor import SourceMonitor

if TYPE_CHECKING:
    from .applier import BusApplier
    from .capture import Capture

__all__ = ["RETAINED_EVERY", "BusCollector"]

RETAINED_EVERY: Final = 15.0


class BusCollector(Collector):
    """Reads `capture` and `applier` at each scrape (see the module docstring)."""

    def __init__(self, capture: Capture | None, applier: BusApplier | None, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.capture = capture
        self.applier = applier
        self.clock = clock
        self._monitor = (SourceMonitor(capture.settings.source.dsn, capture.settings.source.slot)
                         if capture is not None else None)
        self._retained: int | None = None
        self._retained_at = -math.inf
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        if self.capture is not None:
            yield from self._capture(self.capture)
        if self.applier is not None:
            yield from self._sites(self.applier)

    def _capture(self, cap: Capture) -> Iterator[Metric]:
        yield GaugeMetricFamily("cdc_sync_source_up", "1 while the replication stream is connected",
                                value=1.0 if cap.connected else 0.0)
        yield GaugeMetricFamily("cdc_sync_bus_up", "1 while the connection to the bus is up",
                                value=1.0 if cap.client.connected else 0.0)
        yield CounterMetricFamily("cdc_sync_bus_published_chunks",
                                  "Chunks of transactions JetStream acknowledged as stored",
                                  value=float(cap.published))
        yield GaugeMetricFamily(
            "cdc_sync_capture_lag_bytes",
            "WAL received from the source and not yet stored by JetStream (unconfirmed)",
            value=float(max(0, int(cap.received_lsn) - int(cap.confirmed_lsn))))
        retained = self._retained_bytes()
        if retained is not None:
            yield GaugeMetricFamily("cdc_sync_slot_retained_bytes",
                                    "WAL bytes the replication slot holds back",
                                    value=float(retained))

    def _retained_bytes(self) -> int | None:
        with self._lock:
            now = time.monotonic()
            if self._monitor is not None and now - self._retained_at >= RETAINED_EVERY:
                self._retained = self._monitor.retained_bytes()
                self._retained_at = now
            return self._retained

    def _sites(self, applier: BusApplier) -> Iterator[Metric]:
        now = self.clock()
        sites = SiteFamilies(
            "Bytes of source WAL read from the stream but not yet applied at the site")
        bad = CounterMetricFamily("cdc_sync_bus_bad_messages",
                                  "Stream messages that are not cdc-sync's, set aside",
                                  labels=["site"])
        resync = GaugeMetricFamily("cdc_sync_site_needs_resync",
                                   "1 while the stream no longer holds what the site needs",
                                   labels=["site"])
        for feed in applier.feeds:
            sites.add(feed.worker, int(feed.received_lsn), now)
            site = [feed.worker.site]
            bad.add_metric(site, float(feed.bad_messages))
            resync.add_metric(site, 1.0 if feed.needs_resync else 0.0)
        yield from (*sites.families(), bad, resync)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()

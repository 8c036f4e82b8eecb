"""`Pipeline`: source stream → decoder → assembler → one `SiteWorker` per site, with feedback.

Contract:
- Decode once, fan out: every item goes to every site worker, in stream order, handed over
  as one `ItemBatch` per read from the source (a backlog of small transactions would otherwise
  cost three queue hand-overs per transaction and site).
- The source is told (standby status `flush`) only the minimum position every site has durably
  applied; never anything on receipt. The stream always restarts from the slot's confirmed
  position, and sites skip what they already hold.
- A lost source connection, or a site that comes back after a failure, restarts the stream
  (with backoff); the process never exits for that. `stop()` (SIGINT/SIGTERM in the CLI)
  abandons an open source transaction, lets every site commit what is complete, confirms, and
  returns.
- Transactions carrying a replication origin (our own applied writes at this source, when it
  is also a site of another replicator) are not forwarded unless `forward_origins` is set.
- Large transactions are streamed while in progress (protocol 2) when `[source] streaming` is
  on, the server is 14 or later, and nothing needs a transaction's commit time or position
  before it commits (`stream_apply_possible`: source_wins everywhere, no outbox, no in-process
  listeners). Otherwise, with `[source] streaming` on, large transactions are still streamed
  but spooled to disk once (`StreamSpool`) and handed to the sites as ordinary transactions at
  their commit, as native `streaming = on` does. PostgreSQL 15 cannot tell a streamed
  transaction's origin: there, unless `forward_origins` is set, a source that has replication
  origins is read without streaming. A site that meets a lock conflict between its own
  connections asks for a replay without streaming, which is then off for `STREAM_PAUSE` s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Final

from .backoff import backoff_delay
from .changes import (
    DEFAULT_CHUNK_SIZE,
    Assembler,
    Change,
    Table,
    TxBegin,
    TxChanges,
    TxCommit,
    TxItem,
    TxStreamAbort,
    TxStreamChanges,
    TxStreamCommit,
)
from .config import Settings, SiteSettings, table_matches
from .errors import CdcSyncError
from .events import outbox_rows
from .protocol import (
    ROW_TAGS,
    XLOG_DATA_HEADER_SIZE,
    Commit,
    Lsn,
    Message,
    PrimaryKeepalive,
    StreamCommit,
    StreamStart,
    decode_message,
    decode_streamed,
)
from .resolve import Resolver, make_resolver
from .sinks._resolving import origin_name
from .sinks.listeners import Listener, ListenerThread
from .sinks.site import SiteOptions
from .sinks.worker import ItemBatch, Keepalive, SiteWorker
from .source.monitor import HEARTBEAT_PREFIX, SourceMonitor
from .source.stream import ReplicationStream, SlotBusy, StreamLost
from .spool import SpoolError, StreamSpool

log = logging.getLogger(__name__)

STATUS_INTERVAL: Final = 1.0
KEEPALIVE_DISPATCH_INTERVAL: Final = 0.5
RECONNECT_INITIAL: Final = 0.5
RECONNECT_MAX: Final = 10.0
SLOT_BUSY_PATIENCE: Final = 30.0
SLOW_SITE_SECONDS: Final = 10.0
RETENTION_CHECK_INTERVAL: Final = 30.0
STREAM_PAUSE: Final = 300.0
# The outbox is handed to the sinks at the end of each read, or when it holds this much.
OUTBOX_MAX_ITEMS: Final = 4096
OUTBOX_MAX_CHANGES: Final = 5000
_XLOG_DATA: Final = ord("w")


class Pipeline:
    """Streams the source of `settings` into all its sites until `stop()` (see module doc)."""

    def __init__(self, settings: Settings, *, chunk_size: int | None = None,
                 on_applied: Callable[[SiteWorker, int, float], None] | None = None,
                 listeners: Sequence[Listener] = ()) -> None:
        self.settings = settings
        self.chunk_size = chunk_size
        self._stop = threading.Event()
        self._rewind = threading.Event()
        self.rewinds = 0  # stream replays asked for by a site (after it lost its place)
        self.received_lsn = Lsn(0)
        self.confirmed_lsn = Lsn(0)
        self.connected = False
        self.last_error: str | None = None
        self.workers = [
            SiteWorker(
                site.name, site.dsn, settings.source.name,
                on_rewind=self._request_rewind,
                on_applied=on_applied,
                options=site_options(settings, site),
                group_transactions=True,
            )
            for site in settings.sites
        ]
        self.monitor = SourceMonitor(settings.source.dsn, settings.source.slot)
        self.retained_bytes: int | None = None
        self.listeners = [ListenerThread(fn, name=f"listener-{i}") for i, fn in enumerate(listeners)]
        self.stream_apply = stream_apply_possible(settings) and not self.listeners
        # Streamed but held back until commit (see module doc).
        self.stream_spool = settings.source.streaming and not self.stream_apply
        self._spool: StreamSpool | None = None
        self._outbox: list[TxItem | Keepalive] = []  # items for the sinks, one read's worth
        self._outbox_changes = 0
        for w in self.workers:
            w.prestream = self.stream_apply
        self._no_stream_until = 0.0
        self._check_origins = False  # PostgreSQL 15 without forward_origins (see module doc)
        self.streaming = False  # whether the current stream session streams

    # -- control --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _request_rewind(self, worker: SiteWorker) -> None:
        if worker.stream_conflict:
            worker.stream_conflict = False
            self._pause_streaming(f"site {worker.site} waited on its own streamed transaction")
        self.rewinds += 1
        log.info("site %s is back: replaying the stream from the slot", worker.site)
        self._rewind.set()

    def _pause_streaming(self, why: str) -> None:
        log.warning("%s: streaming in-progress transactions is off for %d s", why, STREAM_PAUSE)
        self._no_stream_until = time.monotonic() + STREAM_PAUSE

    def flush_position(self) -> Lsn:
        """The minimum durable position over all sites (0/0 while any site is unknown)."""
        positions = [w.durable_lsn for w in self.workers]
        if any(p is None for p in positions):
            return Lsn(0)
        return min(p for p in positions if p is not None)

    # -- main loop ------------------------------------------------------------------------
    def run(self) -> None:
        for lt in self.listeners:
            lt.start()
        for w in self.workers:
            w.start()
        for w in self.workers:
            w.ready.wait(timeout=15)
        failures = 0
        busy_since: float | None = None
        try:
            while not self._stop.is_set():
                source = self.settings.source
                stream = ReplicationStream(
                    source.dsn, source.slot, source.publication,
                    origin_none=not source.forward_origins,
                    streaming=((self.stream_apply or self.stream_spool)
                               and time.monotonic() >= self._no_stream_until),
                    decoding_work_mem=source.decoding_work_mem,
                )
                try:
                    self._rewind.clear()
                    stream.open(Lsn(0))
                    self.streaming = stream.streaming
                    self._check_origins = (stream.streaming and stream.server_version < 160000
                                           and not source.forward_origins)
                    # Every stream session starts with a Reset: whatever a site still holds
                    # of an earlier session (or waits for, after asking for a replay) is
                    # settled before the first item of this one.
                    self._reset_sinks()
                    self.connected, self.last_error, busy_since = True, None, None
                    failures = 0
                    in_tx = self._stream(stream)
                    if self._stop.is_set():
                        self._shutdown(stream, in_tx)
                except SlotBusy as exc:
                    busy_since = busy_since or time.monotonic()
                    if time.monotonic() - busy_since > SLOT_BUSY_PATIENCE:
                        raise
                    self._note_error(exc)
                except (StreamLost, SpoolError) as exc:
                    self._note_error(exc)
                finally:
                    self.connected = False
                    stream.close()
                if self._stop.is_set():
                    break
                if not self._rewind.is_set():
                    failures += 1
                    self._stop.wait(backoff_delay(failures, RECONNECT_INITIAL, RECONNECT_MAX,
                                                  jitter="equal"))
        finally:
            self._stop_workers()
            self._final_confirm()
            self.monitor.close()

    def _note_error(self, exc: CdcSyncError) -> None:
        self.last_error = str(exc)
        log.warning("%s; reconnecting", exc)

    def _shutdown(self, stream: ReplicationStream, in_tx: bool) -> None:
        if in_tx:
            log.info("abandoning the open source transaction; it will be streamed again")
            self._reset_sinks()
        self._stop_workers()
        flush = self.flush_position()
        # End the COPY cleanly so the walsender reads our last status before we hang up
        # (closing with unread data would reset the connection and may lose it).
        if stream.finish(flush):
            self.confirmed_lsn = max(self.confirmed_lsn, flush)
        log.info("stopped; confirmed %s to the source", self.confirmed_lsn)

    def _stop_workers(self) -> None:
        for w in self.workers:
            w.stop()
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=60)
        for lt in self.listeners:
            if lt.is_alive():
                lt.stop()
                lt.join(timeout=10)

    def _stream(self, stream: ReplicationStream) -> bool:
        """Stream until stop or rewind; return whether a source transaction was open."""
        assembler = Assembler(chunk_size=self.chunk_size or DEFAULT_CHUNK_SIZE)
        forward = self.settings.source.forward_origins
        skipping = False
        last_status = 0.0
        last_keepalive_dispatch = 0.0
        idle_end = dispatched_end = Lsn(0)
        last_data = last_check = time.monotonic()
        self._spool = StreamSpool() if self.streaming and self.stream_spool else None
        self._outbox, self._outbox_changes = [], 0
        try:
            while not self._stop.is_set() and not self._rewind.is_set():
                reply = False
                for raw in stream.read_raw(0.2):
                    if raw[0] != _XLOG_DATA or len(raw) < XLOG_DATA_HEADER_SIZE:
                        frame = stream.decode_frame(raw)  # a keepalive (or StreamLost)
                        if isinstance(frame, PrimaryKeepalive):
                            self.received_lsn = max(self.received_lsn, frame.wal_end)
                            reply = reply or frame.reply_requested
                            if not assembler.in_transaction:
                                idle_end = max(idle_end, frame.wal_end)
                        continue
                    last_data = time.monotonic()
                    data = raw[XLOG_DATA_HEADER_SIZE:]
                    if data[:1] and data[0] in ROW_TAGS:
                        # The hot path: a row change, in a transaction or a streamed block.
                        items = assembler.feed_row(data)
                        if items:
                            skipping = self._emit(items, skipping, forward, stream)
                        continue
                    if assembler.in_stream_block:
                        xid, msg = decode_streamed(data)
                        skipping = self._emit(assembler.feed_streamed(xid, msg, len(data)),
                                              skipping, forward, stream)
                        continue
                    msg = decode_message(data)
                    if type(msg) is Message and msg.prefix == HEARTBEAT_PREFIX:
                        continue  # only there to make the slot advance (see monitor)
                    if (type(msg) is StreamStart and msg.first_segment
                            and self._check_origins and self.monitor.has_replication_origins()):
                        self._pause_streaming("the source has replication origins, which "
                                              "PostgreSQL 15 does not show for streamed "
                                              "transactions")
                        self._rewind.set()
                        break
                    skipping = self._emit(assembler.feed(msg, len(data)), skipping, forward,
                                          stream)
                    if isinstance(msg, (Commit, StreamCommit)):
                        self.received_lsn = max(self.received_lsn, msg.end_lsn)
                self._flush_outbox(stream)
                now = time.monotonic()
                # Between transactions, everything up to the last keepalive's position has been
                # handed out: sites with nothing pending may count it as applied. Throttled, but
                # the last one is never dropped (or an idle site would show lag forever).
                if (idle_end > dispatched_end and not assembler.in_transaction
                        and now - last_keepalive_dispatch >= KEEPALIVE_DISPATCH_INTERVAL):
                    last_keepalive_dispatch = now
                    dispatched_end = idle_end
                    self._dispatch(Keepalive(idle_end), stream)
                    self._flush_outbox(stream)
                if reply or now - last_status >= STATUS_INTERVAL:
                    self._send_status(stream)
                    last_status = now
                if now - last_data >= self.settings.source.heartbeat_seconds:
                    self.monitor.heartbeat()
                    last_data = now
                if now - last_check >= RETENTION_CHECK_INTERVAL:
                    last_check = now
                    self._check_retention()
        finally:
            in_tx = assembler.in_transaction
            if self._spool is not None:
                self._spool.reset()
                self._spool = None
        return in_tx

    def _emit(self, items: list[TxItem], skipping: bool, forward: bool,
              stream: ReplicationStream) -> bool:
        """Dispatch items, leaving out the transactions that carry a replication origin unless
        `forward`; returns whether the open transaction is being skipped. (Streamed items never
        come while one is: a stream block cannot start inside a transaction.) With a spool,
        streamed items are spooled and each committed one goes out as a whole transaction."""
        for item in (items if self._spool is None else self._unspooled(items, self._spool)):
            if isinstance(item, TxBegin):
                skipping = item.origin is not None and not forward
            if not skipping:
                self._dispatch(item, stream)
            elif isinstance(item, TxCommit):
                # Skipped transactions still move every site forward.
                skipping = False
                self._dispatch(Keepalive(item.end_lsn), stream)
        return skipping

    @staticmethod
    def _unspooled(items: list[TxItem], spool: StreamSpool) -> Iterator[TxItem]:
        for item in items:
            if isinstance(item, TxStreamChanges):
                spool.add(item)
            elif isinstance(item, TxStreamCommit):
                yield from spool.commit(item)
            elif isinstance(item, TxStreamAbort):
                spool.abort(item)
            else:
                yield item

    def _check_retention(self) -> None:
        retained = self.monitor.retained_bytes()
        if retained is None:
            return
        self.retained_bytes = retained
        limit = self.settings.source.max_retained_bytes
        if retained > limit:
            laggard = self.laggard()
            log.warning("slot %s retains %d bytes of WAL (max_retained_bytes %d); held back by "
                        "site %s", self.settings.source.slot, retained, limit,
                        laggard.site if laggard else "?")

    def laggard(self) -> SiteWorker | None:
        """The site with the lowest durable position: the one holding the slot back."""
        known = [w for w in self.workers if w.durable_lsn is not None]
        unknown = [w for w in self.workers if w.durable_lsn is None]
        if unknown:
            return unknown[0]
        return min(known, key=lambda w: w.durable_lsn or 0) if known else None

    def _send_status(self, stream: ReplicationStream) -> None:
        flush = self.flush_position()
        if flush > self.confirmed_lsn:
            self.confirmed_lsn = flush
        stream.send_status(self.received_lsn, self.confirmed_lsn, self.confirmed_lsn)

    def _dispatch(self, item: TxItem | Keepalive, stream: ReplicationStream) -> None:
        """Queue `item` for the sinks; `_flush_outbox` hands them over once per read from the
        source, or sooner when they add up (a spooled transaction read back from disk)."""
        outbox = self._outbox
        outbox.append(item)
        if isinstance(item, TxChanges):
            self._outbox_changes += len(item.changes)
        if len(outbox) >= OUTBOX_MAX_ITEMS or self._outbox_changes >= OUTBOX_MAX_CHANGES:
            self._flush_outbox(stream)

    def _flush_outbox(self, stream: ReplicationStream) -> None:
        """Hand the queued items to every sink: one `ItemBatch` per site worker, item by item
        to listeners."""
        items, self._outbox, self._outbox_changes = self._outbox, [], 0
        if not items:
            return
        batch = ItemBatch.of(items)
        for w in self.workers:
            self._deliver(w, partial(w.put, batch, timeout=0.5), stream)
        for listener in self.listeners:
            for item in items:
                self._deliver(listener, partial(listener.put, item, timeout=0.5), stream)

    def _deliver(self, w: SiteWorker | ListenerThread, put: Callable[[], bool],
                 stream: ReplicationStream) -> None:
        """`put()` until it takes the item, the sink stops accepting or, for a site, the
        site is too slow (it is detached)."""
        last_status = blocked_since = time.monotonic()
        while not put():
            if not w.accepting or self._stop.is_set() or self._rewind.is_set():
                break
            if isinstance(w, SiteWorker) and time.monotonic() - blocked_since > SLOW_SITE_SECONDS:
                # A slow site must not stall the others: it leaves the stream and
                # replays it from the slot (which keeps its backlog) when it is ready.
                w.detach()
                break
            # A slow site: keep the source connection alive while we wait for it.
            if time.monotonic() - last_status >= STATUS_INTERVAL:
                self._send_status(stream)
                last_status = time.monotonic()

    def _sinks(self) -> list[SiteWorker | ListenerThread]:
        return [*self.workers, *self.listeners]

    def _reset_sinks(self) -> None:
        for w in self._sinks():
            w.reset()

    def _final_confirm(self) -> None:
        flush = self.flush_position()
        confirmed = self.monitor.confirmed_flush()
        if flush == 0 or (confirmed is not None and flush <= confirmed):
            return
        stream = ReplicationStream(self.settings.source.dsn, self.settings.source.slot,
                                   self.settings.source.publication)
        try:
            stream.open(Lsn(0))
            stream.send_status(flush, flush, flush)
            self.confirmed_lsn = flush
        except CdcSyncError as exc:
            log.warning("could not confirm %s to the source at shutdown: %s", flush, exc)
        finally:
            stream.close()


def stream_apply_possible(settings: Settings) -> bool:
    """Whether in-progress transactions may be streamed and applied as they arrive: asked for
    (`[source] streaming`), and nothing needs a transaction's commit time or position before
    it commits: every table source_wins without counters, no outbox or connectors."""
    if not settings.source.streaming:
        return False
    if settings.connectors or "outbox" in settings.model_fields_set:
        return False
    conf = settings.conflicts
    strategies = [conf.strategy] + [t.strategy or conf.strategy for t in conf.tables.values()]
    return (all(s == "source_wins" for s in strategies)
            and not any(t.counters for t in conf.tables.values()))


def site_options(settings: Settings, site: SiteSettings) -> SiteOptions:
    """How `site` applies this source: table filter, resolvers, outbox, replication origin."""
    resolvers: dict[str, Resolver | None] = {}

    def resolver_for(qualified: str) -> Resolver | None:
        if qualified not in resolvers:
            policy = settings.conflicts.for_table(qualified)
            r = make_resolver(policy, site=site.name)
            resolvers[qualified] = r if r.needs_local_rows else None
        return resolvers[qualified]

    outbox = None
    wants_outbox = bool(settings.connectors) or "outbox" in settings.model_fields_set
    if wants_outbox and settings.outbox_site.name == site.name:
        patterns = sorted({p for c in settings.connectors for p in c.tables}) or None

        def outbox(source: str, begin: TxBegin, changes: Sequence[Change]) -> list[tuple[Any, ...]]:
            return outbox_rows(source, begin, changes, tables=patterns)

    return SiteOptions(
        source=settings.source.name, site=site.name,
        wants=_table_filter(settings.source.tables, site.tables),
        resolver_for=resolver_for, outbox=outbox,
        origin=origin_name(settings.source.name, site.name),
        tombstone_max_age=settings.conflicts.tombstone_max_age_seconds,
    )


def _table_filter(source_tables: list[str], site_tables: list[str] | None) -> Callable[[Table], bool]:
    patterns = site_tables if site_tables is not None else source_tables

    def wants(table: Table) -> bool:
        return table_matches(patterns, table.qualified)

    return wants

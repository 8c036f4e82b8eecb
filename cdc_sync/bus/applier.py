"""`BusApplier`: JetStream → sites (`cdc-sync apply --site NAME`).

Contract:
- One `SiteWorker` per site, exactly as in-process (batching, conflicts, dead letters,
  outbox, grouping, loop prevention), fed by a `SiteFeed` thread that reads the stream; the
  sites of one process share one `SharedFeed` (the stream read and decoded once) for as long
  as they keep pace (see its docstring).
- The site's progress is the truth: a feed starts (and, whenever its worker lost its place,
  starts again) at the first message whose transaction commits at or after the site's
  durable position, found by a binary search over the stream's headers (`find_start`). What
  the consumer acknowledged is never used, and a transaction that arrives twice is skipped by
  the worker, as a replayed slot is in-process.
- A transaction whose chunks stop before its commit (capture died mid-transaction) and that
  arrives again from chunk 0 is discarded: the feed remembers those messages, drops its worker's
  open transaction and starts again from the site's progress, skipping them.
- When the messages a site needs were already discarded by the stream's retention, the site
  is `needs_resync` (status, log, never skipped silently) and nothing more is applied to it
  until `cdc-sync init` re-copies it.
- A message that is not ours, or of a newer format, is logged with its sequence, recorded once
  in the site's dead letters (op `bus_message`, the stream and sequence in `row_data`) and
  skipped (counted in `bad_messages`); it never stops the feed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

import psycopg
from psycopg.types.json import Jsonb

from ..backoff import backoff_delay
from ..changes import DEFAULT_CHUNK_SIZE, Assembler, TxCommit, TxItem
from ..config import Settings, SiteSettings
from ..errors import CdcSyncError
from ..protocol import ROW_TAGS, Lsn, decode_message
from ..sessions import connect_site
from ..sinks.worker import ItemBatch, SiteWorker
from ._format import (
    BUS_MESSAGE_OP,
    FORMAT_VERSION,
    HEADER_CHUNK,
    HEADER_FORMAT,
    HEADER_PREV,
    READABLE_FORMATS,
    BusFormatError,
    decode_body,
    span_of,
)
from .client import BusClient, BusError, BusMessage, BusState

__all__ = ["BusApplier", "SharedFeed", "SiteFeed", "find_start"]

log = logging.getLogger(__name__)

# Messages are at most about CHUNK_BYTES (512 KiB): 64 of them stay far below nats-py's
# 256 MiB of pending bytes per subscription, beyond which it drops messages (slow consumer).
FETCH_BATCH: Final = 64
FETCH_TIMEOUT: Final = 0.5
RESTART_INITIAL: Final = 0.5
RESTART_MAX: Final = 10.0
RESYNC_CHECK_SECONDS: Final = 3.0
CONNECT_WAIT: Final = 5.0  # a shared feed waits this long for its sites' first connection
DETACH_AFTER: Final = 5.0  # a site whose queue stays full this long reads on its own
_DEAD_LETTER_SQL: Final = (
    "INSERT INTO cdc_sync.dead_letters (source, op, row_data, error) "
    "SELECT %s, %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM cdc_sync.dead_letters "
    "WHERE source = %s AND op = %s AND row_data @> %s)")


def find_start(client: BusClient, state: BusState, position: Lsn) -> tuple[int, bool]:
    """(sequence to start at, whether messages the site needs are gone).

    The first message whose last transaction commits at or after `position` (binary search:
    the stream holds transactions once, in commit order; the worker skips those of the
    message it has). Gone: retention discarded messages (`first_seq` > 1) and the oldest one
    left is not known to follow `position` directly."""
    lo, hi = state.first_seq, state.last_seq + 1
    if state.messages == 0:
        return state.last_seq + 1, False
    while lo < hi:
        mid = (lo + hi) // 2
        span = span_of(client.headers_at(mid))
        if span is not None and span[1] >= position:
            hi = mid
        else:
            lo = mid + 1
    gone = False
    if lo == state.first_seq and state.first_seq > 1:
        first = client.headers_at(state.first_seq) or {}
        prev = first.get(HEADER_PREV)
        gone = prev is None or int(prev, 16) > position
    return lo, gone


class _Reader:
    """Turns the messages of one consumer into items for the sites, as both feeds read: a
    message that is not ours goes to `bad`; a transaction that stopped short and comes again
    from chunk 0 ends the batch with the sequences of its partial messages (the caller
    forgets them and starts again from the sites' progress); the rest of a transaction
    begun before the consumer's start is skipped."""

    def __init__(self, chunk_size: int) -> None:
        self.assembler = Assembler(chunk_size=chunk_size)
        self._tx_first = 0  # sequence of chunk 0 of the open transaction

    def read(self, msgs: Sequence[BusMessage], discarded: set[int],
             bad: Callable[[BusMessage], None]) -> tuple[list[TxItem], range | None]:
        assembler = self.assembler
        items: list[TxItem] = []
        for msg in msgs:
            if msg.seq in discarded:
                continue
            h = msg.headers
            if h.get(HEADER_FORMAT) not in READABLE_FORMATS or HEADER_CHUNK not in h:
                bad(msg)
                continue
            chunk = int(h[HEADER_CHUNK])
            if chunk == 0 and assembler.in_transaction:
                return [], range(self._tx_first, msg.seq)
            if chunk > 0 and not assembler.in_transaction:
                continue  # the rest of a transaction we did not start with
            if chunk == 0:
                self._tx_first = msg.seq
            items.extend(_feed(assembler, msg.data))
        return items, None


def _feed(assembler: Assembler, body: bytes) -> list[TxItem]:
    out: list[TxItem] = []
    for frame in decode_body(body):
        if frame[0] in ROW_TAGS:
            out.extend(assembler.feed_row(frame))
        else:
            out.extend(assembler.feed(decode_message(frame), len(frame)))
    return out


class SiteFeed(threading.Thread):
    """Reads the stream into one site's worker (see the module docstring)."""

    def __init__(self, client: BusClient, worker: SiteWorker, *,
                 chunk_size: int | None = None) -> None:
        super().__init__(name=f"bus-feed-{worker.site}", daemon=True)
        self.client = client
        self.worker = worker
        self.chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
        self._halt = threading.Event()
        self._restart = threading.Event()
        self._discarded: set[int] = set()  # sequences of partial transactions
        self.needs_resync = False
        self.bad_messages = 0
        self.received_lsn = Lsn(0)  # the end of the last whole transaction read (metrics)
        self.last_error: str | None = None
        self.shared: SharedFeed | None = None  # reading for this site too, until it detaches

    def stop(self) -> None:
        self._halt.set()

    def restart(self, _worker: SiteWorker | None = None) -> None:
        """The worker lost its place (it calls this as `on_rewind`): start again from its
        site's progress (on its own, if a `SharedFeed` was reading for it)."""
        shared = self.shared
        if shared is not None:
            shared.detach(self)
        else:
            self._restart.set()

    def run(self) -> None:
        failures = 0
        while not self._halt.is_set():
            try:
                self._session()
                failures = 0
            except (BusError, BusFormatError, CdcSyncError, TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("site %s: %s; retrying", self.worker.site, exc)
                failures += 1
            if failures and not self._halt.is_set():
                self._halt.wait(backoff_delay(failures, RESTART_INITIAL, RESTART_MAX,
                                              jitter="equal"))

    def _session(self) -> None:
        worker = self.worker
        while worker.durable_lsn is None and not self._halt.is_set():
            self._halt.wait(0.2)  # the worker is (re)connecting to its site
        if self._halt.is_set():
            return
        if self.needs_resync:
            self._reread_progress()  # `init` may have re-copied the site meanwhile
        position = worker.durable_lsn or Lsn(0)
        state = self.client.state()
        start, gone = find_start(self.client, state, position)
        if gone:
            if not self.needs_resync:
                log.error("site %s needs a resync: the stream %s no longer holds the changes "
                          "after %s (its retention discarded them); run `cdc-sync init`",
                          worker.site, state.stream, position)
            self.needs_resync = True
            self._halt.wait(RESYNC_CHECK_SECONDS)
            return
        self.needs_resync = False
        self._restart.clear()
        worker.reset()
        reader = _Reader(self.chunk_size)
        consumer = self.client.consumer(start)
        try:
            while not self._halt.is_set() and not self._restart.is_set():
                items, partial = reader.read(consumer.fetch(FETCH_BATCH, FETCH_TIMEOUT),
                                             self._discarded, self._dead_letter)
                if partial is not None:
                    # The open transaction stopped short (capture died mid-way) and comes
                    # again: forget it at the site too, from the site's progress.
                    self._discarded.update(partial)
                    log.info("site %s: discarding a partial transaction (messages %d-%d)",
                             worker.site, partial.start, partial.stop - 1)
                    self._restart.set()
                    break
                if items:
                    last = items[-1]
                    if isinstance(last, TxCommit):
                        self.received_lsn = max(self.received_lsn, last.end_lsn)
                    self._deliver(ItemBatch.of(items))
        finally:
            consumer.close()

    def _dead_letter(self, msg: BusMessage) -> None:
        """Set aside a message that is not ours (or of another format): counted, logged with
        its sequence and recorded in the site's dead letters once (a feed that starts again
        meets it again)."""
        self.bad_messages += 1
        worker, stream = self.worker, self.client.stream
        fmt = msg.headers.get(HEADER_FORMAT)
        why = (f"stream {stream} message {msg.seq} is not a cdc-sync message" if fmt is None
               else f"stream {stream} message {msg.seq} has format {fmt[:20]!r}, this "
                    f"cdc-sync reads {FORMAT_VERSION!r} (upgrade the appliers)")
        log.error("site %s: %s: skipped, see `cdc-sync dead-letters`", worker.site, why)
        what = Jsonb({"stream": stream, "seq": msg.seq})
        row = Jsonb({"stream": stream, "seq": msg.seq, "bytes": len(msg.data),
                     "headers": {k: v[:200] for k, v in list(msg.headers.items())[:20]}})
        try:
            with connect_site(worker.dsn) as conn:
                conn.execute(_DEAD_LETTER_SQL, (worker.source, BUS_MESSAGE_OP, row, why,
                                                worker.source, BUS_MESSAGE_OP, what))
                conn.commit()
        except psycopg.Error as exc:
            log.warning("site %s: cannot record the dead letter: %s", worker.site,
                        " ".join(str(exc).split()))

    def _reread_progress(self) -> None:
        worker = self.worker
        try:
            with connect_site(worker.dsn) as conn:
                row = conn.execute("SELECT applied_lsn::text FROM cdc_sync.progress "
                                   "WHERE source = %s", (worker.source,)).fetchone()
        except psycopg.Error:
            return
        if row is not None and row[0]:
            worker.durable_lsn = max(worker.durable_lsn or Lsn(0), Lsn.parse(row[0]))

    def _deliver(self, batch: ItemBatch) -> None:
        while not self._halt.is_set() and not self._restart.is_set():
            if self.worker.put(batch, timeout=0.5):
                return
            if not self.worker.accepting:
                self._restart.set()  # the site went away: it resumes from its progress
                return


class SharedFeed(threading.Thread):
    """Reads the stream once for the sites of one process: each message is fetched and
    decoded once and the same batches go to every member's worker (decode once, fan out).

    It starts at the earliest member's place; a member ahead skips what its site holds, as
    after any replay. A member leaves for a `SiteFeed` of its own (its thread starts then,
    from its site's progress) and does not come back, when: its site is not connected when
    reading starts, its messages are gone (needs resync), its worker lost its place
    (`on_rewind`), it stops accepting, or its queue stays full for `DETACH_AFTER` seconds (a
    slow site never holds the others back for longer). With no member left it ends."""

    def __init__(self, client: BusClient, members: Sequence[SiteFeed], *,
                 chunk_size: int | None = None) -> None:
        super().__init__(name="bus-feed-shared", daemon=True)
        self.client = client
        self.chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
        self._members = list(members)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._restart = threading.Event()
        self._discarded: set[int] = set()
        for m in self._members:
            m.shared = self

    @property
    def members(self) -> list[SiteFeed]:
        with self._lock:
            return list(self._members)

    def stop(self) -> None:
        self._halt.set()

    def detach(self, member: SiteFeed) -> None:
        """`member` reads on its own from now on (from any thread)."""
        with self._lock:
            if member not in self._members:
                return
            self._members.remove(member)
            member.shared = None
            member._discarded.update(self._discarded)
            if not self._halt.is_set():
                log.info("site %s: reads the stream on its own from its progress",
                         member.worker.site)
                member.start()

    def run(self) -> None:
        failures = 0
        while not self._halt.is_set() and self.members:
            try:
                self._session()
                failures = 0
            except (BusError, BusFormatError, CdcSyncError, TimeoutError) as exc:
                why = str(exc) or type(exc).__name__
                log.warning("sites %s: %s; retrying",
                            ", ".join(m.worker.site for m in self.members), why)
                for m in self.members:
                    m.last_error = why
                failures += 1
            if failures and not self._halt.is_set():
                self._halt.wait(backoff_delay(failures, RESTART_INITIAL, RESTART_MAX,
                                              jitter="equal"))

    def _session(self) -> None:
        deadline = time.monotonic() + CONNECT_WAIT
        while (not self._halt.is_set() and time.monotonic() < deadline
               and any(m.worker.durable_lsn is None for m in self.members)):
            self._halt.wait(0.2)
        state = self.client.state()
        starts: list[int] = []
        for m in self.members:
            position = m.worker.durable_lsn
            if position is None:
                self.detach(m)  # not connected: it waits for its site on its own
                continue
            start, gone = find_start(self.client, state, position)
            if gone:
                self.detach(m)  # it shows `needs_resync` and waits for `init` on its own
                continue
            starts.append(start)
        members = self.members
        if self._halt.is_set() or not members or not starts:
            return
        self._restart.clear()
        for m in members:
            m.worker.reset()
        reader = _Reader(self.chunk_size)
        consumer = self.client.consumer(min(starts))

        def bad(msg: BusMessage) -> None:
            for m in self.members:
                m._dead_letter(msg)

        try:
            while not self._halt.is_set() and not self._restart.is_set() and self.members:
                items, partial = reader.read(consumer.fetch(FETCH_BATCH, FETCH_TIMEOUT),
                                             self._discarded, bad)
                if partial is not None:  # as in `SiteFeed._session`
                    self._discarded.update(partial)
                    for m in self.members:
                        m._discarded.update(partial)
                    log.info("sites: discarding a partial transaction (messages %d-%d)",
                             partial.start, partial.stop - 1)
                    self._restart.set()
                    break
                if items:
                    batch = ItemBatch.of(items)
                    last = items[-1]
                    for m in self.members:
                        if isinstance(last, TxCommit):
                            m.received_lsn = max(m.received_lsn, last.end_lsn)
                        self._deliver(m, batch)
        finally:
            consumer.close()

    def _deliver(self, member: SiteFeed, batch: ItemBatch) -> None:
        worker = member.worker
        until = time.monotonic() + DETACH_AFTER
        while not self._halt.is_set() and not self._restart.is_set():
            with self._lock:  # never a put after `detach`: its own feed resets the queue
                if member.shared is not self:
                    return  # it left meanwhile (its worker rewound)
                if worker.put(batch, timeout=0.5):
                    return
            if not worker.accepting or time.monotonic() > until:
                if worker.accepting:
                    log.warning("site %s is slow: it reads the stream on its own, so the "
                                "other sites do not wait for it", worker.site)
                self.detach(member)
                return


class BusApplier:
    """Applies the stream of `settings`' source to `sites` (default: all) until `stop()`.
    Several sites share one `SharedFeed` (one read and decoding of the stream)."""

    def __init__(self, settings: Settings, sites: Sequence[str] | None = None, *,
                 on_applied: Callable[[SiteWorker, int, float], None] | None = None,
                 chunk_size: int | None = None) -> None:
        from ..pipeline import site_options  # pipeline imports much

        if settings.bus is None:
            raise CdcSyncError("apply needs a [bus] section in the configuration")
        chosen: list[SiteSettings] = ([settings.site(n) for n in sites] if sites
                                      else list(settings.sites))
        self.settings = settings
        self._stop = threading.Event()
        self.clients: list[BusClient] = []
        self.workers: list[SiteWorker] = []
        self.feeds: list[SiteFeed] = []
        self.shared: SharedFeed | None = None
        for site in chosen:
            client = BusClient(settings.bus, settings.source.name)
            worker = SiteWorker(site.name, site.dsn, settings.source.name,
                                on_applied=on_applied, options=site_options(settings, site),
                                group_transactions=True)
            feed = SiteFeed(client, worker, chunk_size=chunk_size)
            worker.on_rewind = feed.restart
            self.clients.append(client)
            self.workers.append(worker)
            self.feeds.append(feed)
        if len(self.feeds) > 1:
            client = BusClient(settings.bus, settings.source.name)
            self.clients.append(client)
            self.shared = SharedFeed(client, self.feeds, chunk_size=chunk_size)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            for client in self.clients:
                client.connect()
            for w in self.workers:
                w.start()
            for w in self.workers:
                w.ready.wait(timeout=15)
            if self.shared is not None:
                self.shared.start()
            else:
                for f in self.feeds:
                    f.start()
            while not self._stop.wait(0.5):
                pass
        finally:
            if self.shared is not None:
                self.shared.stop()
                if self.shared.is_alive():
                    self.shared.join(timeout=30)
            for f in self.feeds:
                f.stop()
            for f in self.feeds:
                if f.is_alive():
                    f.join(timeout=30)
            for w in self.workers:
                w.stop()
            for w in self.workers:
                if w.is_alive():
                    w.join(timeout=60)
            for client in self.clients:
                client.close()
            log.info("apply stopped")

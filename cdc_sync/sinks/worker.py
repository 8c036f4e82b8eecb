"""`SiteWorker`: one thread per site applying the shared item stream at the site's own pace.

Contract:
- The pipeline `put`s every item (`TxBegin`/`TxChanges`/`TxCommit`, `Keepalive`, `Reset`) to
  every worker in stream order. The queue is bounded: a slow site makes `put` wait; a site that
  is down does not accept items at all (they are dropped, the slot keeps them).
- `put` also takes an `ItemBatch`: the items of one read from the source, handed over as one
  queue entry and taken one by one, in order, as if put singly.
- Transactions whose commit LSN is below what the site already holds are skipped, so a
  transaction is applied at most once; because progress is committed with the rows, at least
  once too.
- Several small source transactions share one target transaction (until the queue is empty,
  a `Keepalive` with nothing queued behind it says the source has sent everything, or
  `group_max_changes`/`group_max_seconds` are reached; a keepalive that stands for a skipped
  transaction of another office, with more queued, does not end the group); a huge one is
  applied chunk by chunk in one target transaction.
- An idle worker checks its site connection every `IDLE_CHECK_SECONDS`: a site that went
  away shows as disconnected in `status` without waiting for the next change.
- `durable_lsn` only ever grows and only to positions committed on the site (or, on an idle
  stream, to the keepalive position when nothing is pending): the pipeline confirms the
  minimum over all workers to the source.
- A deadlock or lock timeout in the open target transaction (against a local writer: our
  replicators cannot deadlock each other, see `_locks`) rolls back and applies that target
  transaction again (`_retry`, up to RETRY_ATTEMPTS times), never replays the stream; the
  worker keeps what the transaction applied for that (up to RETRY_KEEP_CHANGES changes).
  Chunks that complete a target transaction are applied with `final=True`.
- When a site connection fails, the worker reconnects with backoff, then calls `on_rewind` and
  ignores items until the next `Reset`: the pipeline restarts the stream from the slot.
- A transaction the source streams while in progress (`TxStreamChanges`) is applied as it
  arrives, in its own target transaction on a second site connection (one per open streamed
  transaction, each tagged with its own replication origin), and committed with the site's
  progress at `TxStreamCommit`, in source commit order: everything received before it is
  committed first. Before each streamed chunk the main target transaction is committed, so
  the rows the chunk touches were released by earlier transactions, as they were at the
  source. A subtransaction's changes get a savepoint, rolled back by its `TxStreamAbort`.
  While streamed transactions are open, every connection of the site waits at most
  `STREAM_LOCK_TIMEOUT_MS` for a lock: a wait on a lock that one of our own connections holds
  could never end, so it fails instead, and the worker asks for a replay without streaming
  (`on_rewind` with `stream_conflict` set).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Final, TypeVar

import psycopg

from ..backoff import backoff_delay
from ..changes import (
    DEFAULT_CHUNK_SIZE,
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
from ..errors import CdcSyncError, mask_dsn
from ..protocol import INVALID_LSN, Lsn
from ..sessions import connect_site
from .site import SiteOptions, SiteWriter

log = logging.getLogger(__name__)

DEFAULT_QUEUE_ITEMS: Final = 4096
# The queue also holds at most this many row changes (one chunk more when it is empty): a
# site can take the next group while it applies one, and a backlog of small transactions is
# not held to a few transactions at a time (the decoder and the site then took turns).
DEFAULT_QUEUE_CHANGES: Final = 20_000
DEFAULT_GROUP_MAX_CHANGES: Final = 20_000
DEFAULT_GROUP_MAX_SECONDS: Final = 0.5
FLUSH_CHANGES: Final = DEFAULT_CHUNK_SIZE
BACKOFF_INITIAL: Final = 0.5
BACKOFF_MAX: Final = 15.0
STREAM_LOCK_TIMEOUT_MS: Final = 5000
IDLE_CHECK_SECONDS: Final = 5.0
# A deadlock (with a local writer) retries the target transaction, if it held at most this
# many changes (else the stream is replayed), at most RETRY_ATTEMPTS times.
RETRY_KEEP_CHANGES: Final = 200_000
RETRY_ATTEMPTS: Final = 8
RETRY_PAUSE: Final = 0.02  # an idle worker checks its site connection this often
SPARE_STREAM_WRITERS: Final = 1


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The stream is between transactions and the source has sent everything up to `wal_end`."""

    wal_end: Lsn


class Reset:
    """The stream restarts: forget anything not yet committed on the site."""


class _Stop:
    pass


@dataclass
class _StreamWriter:
    """A site connection for streamed transactions; `index` picks its replication origin."""

    writer: SiteWriter
    index: int


@dataclass
class _OpenStream:
    """A streamed transaction being applied: its connection, the pseudo Begin its changes are
    applied under (no commit position or time yet), the subtransactions with a savepoint."""

    conn: _StreamWriter
    begin: TxBegin
    savepoints: list[int] = field(default_factory=list)
    changes: int = 0
    started: float = 0.0


RESET: Final = Reset()
_STOP: Final = _Stop()

WorkItem = TxItem | Keepalive | Reset | _Stop
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ItemBatch:
    """Consecutive stream items queued as one entry (`SiteWorker.put`): a backlog of small
    transactions costs one queue hand-over per read from the source, not three per
    transaction. `changes` is the number of row changes the items carry."""

    items: tuple[WorkItem, ...]
    changes: int

    @classmethod
    def of(cls, items: Sequence[WorkItem]) -> ItemBatch:
        return cls(tuple(items), sum(_changes_in(i) for i in items))


class SiteWorker(threading.Thread):
    """Applies the stream to one site (see the module docstring)."""

    def __init__(
        self,
        name: str,
        dsn: str,
        source: str,
        *,
        wants: Callable[[Table], bool] | None = None,
        on_rewind: Callable[[SiteWorker], None] | None = None,
        queue_items: int = DEFAULT_QUEUE_ITEMS,
        queue_changes: int = DEFAULT_QUEUE_CHANGES,
        group_max_changes: int = DEFAULT_GROUP_MAX_CHANGES,
        group_max_seconds: float = DEFAULT_GROUP_MAX_SECONDS,
        on_applied: Callable[[SiteWorker, int, float], None] | None = None,
        options: SiteOptions | None = None,
        group_transactions: bool = True,
    ) -> None:
        super().__init__(name=f"site-{name}", daemon=True)
        self.site = name
        self.dsn = dsn
        self.source = source
        self.wants = wants
        self.on_rewind = on_rewind or (lambda _w: None)
        self.on_applied = on_applied or (lambda _w, _n, _s: None)
        self.group_max_changes = group_max_changes
        self.group_max_seconds = group_max_seconds
        self.group_transactions = group_transactions
        self.options = options or SiteOptions(source=source, site=name)
        if wants is not None:
            self.options.wants = wants
        self.dead_letters = 0
        self.conflicts = 0
        self.lock_retries = 0  # target transactions retried after a deadlock or lock timeout
        self.queue: queue.Queue[WorkItem | ItemBatch] = queue.Queue(maxsize=queue_items)
        self._local: deque[WorkItem] = deque()  # the rest of the batch being taken
        self.queue_changes = queue_changes
        self._queued_changes = 0  # row changes in the queue (`put` waits above queue_changes)
        self._room = threading.Condition()
        self.durable_lsn: Lsn | None = None
        self.last_commit_ts: datetime | None = None
        self.applied_changes = 0
        self.connected = False
        self.last_error: str | None = None
        self._accepting = False
        self._awaiting_reset = False
        self._detached = False
        self._missed = False  # an item was refused: the stream must be replayed for us
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self.idle_check_seconds = IDLE_CHECK_SECONDS
        self.stream_conflict = False  # a lock wait between our own connections: no streaming
        # Streamed transactions may come: keep a stream connection open, so the first chunk
        # of a large transaction does not wait for a connection.
        self.prestream = False
        self._streams: dict[int, _OpenStream] = {}
        self._spare: list[_StreamWriter] = []

    # -- producer side --------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting

    def put(self, item: WorkItem | ItemBatch, timeout: float | None = None) -> bool:
        """Queue `item` (or a batch of items, in order); False if the site is not accepting or
        the queue stayed full."""
        if not self._accepting:
            self._missed = True
            return False
        n = item.changes if isinstance(item, ItemBatch) else _changes_in(item)
        if n:
            with self._room:
                if not self._room.wait_for(
                        lambda: self._queued_changes == 0
                        or self._queued_changes + n <= self.queue_changes, timeout):
                    return False
                self._queued_changes += n
        try:
            self.queue.put(item, timeout=timeout)
        except queue.Full:
            self._taken(n)
            return False
        return True

    def _taken(self, n: int) -> None:
        """`n` row changes left the queue."""
        if n:
            with self._room:
                self._queued_changes = max(0, self._queued_changes - n)
                self._room.notify_all()

    def _get(self, timeout: float | None) -> WorkItem:
        local = self._local
        if local:
            return local.popleft()
        item = self.queue.get(timeout=timeout)
        if isinstance(item, ItemBatch):
            self._taken(item.changes)
            local.extend(item.items)
            return local.popleft()
        self._taken(_changes_in(item))
        return item

    def idle(self) -> bool:
        """Nothing queued for this worker (nor left of a batch it took)."""
        return not self._local and self.queue.empty()

    @property
    def open_streams(self) -> int:
        """Streamed source transactions being applied here, not yet committed or aborted."""
        return len(self._streams)

    def detach(self) -> None:
        """Stop taking items: the site is too slow. It catches up later from the slot."""
        if self._accepting:
            log.warning("site %s is too slow: detached; it will catch up from the slot", self.site)
        self._accepting = False
        self._detached = True

    def reset(self) -> None:
        """The stream restarts: drop every queued item of the old stream and queue a Reset.

        Never refused (unlike `put`): a worker holding part of a transaction of the old stream
        must learn the stream restarted, or it would apply the replay on top of it. (What is
        left of a batch the worker already took is applied first, as items it had already
        taken would be: they are the old stream's next items, in order.)
        """
        with self.queue.mutex:
            self.queue.queue.clear()
            self.queue.not_full.notify_all()
        with self._room:
            self._queued_changes = 0
            self._room.notify_all()
        self.queue.put(RESET)

    def stop(self) -> None:
        """Ask the worker to commit what is complete and exit."""
        self._stopping.set()
        try:
            self.queue.put_nowait(_STOP)
        except queue.Full:
            pass

    # -- consumer side --------------------------------------------------------------------
    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                writer = SiteWriter(connect_site(self.dsn, application_name=f"cdc_sync:{self.source}"),
                                    self.source, options=self.options)
            except psycopg.Error as exc:
                self._down(f"cannot connect: {exc}")
                failures += 1
                self._sleep(failures)
                continue
            try:
                applied, _snap = writer.read_progress()
                self.durable_lsn = max(self.durable_lsn or applied, applied)
                self.connected = True
                self.last_error = None
                if self._missed:
                    # Items were refused while we were away: have the stream replayed, and
                    # ignore everything until the replay starts (Reset).
                    self._awaiting_reset = True
                    self._drain()
                    self._missed = False
                    self._accepting = True
                    self.on_rewind(self)
                else:
                    self._accepting = True
                if self.prestream and not self._spare:
                    self._spare.append(self._stream_writer())
                self.ready.set()
                failures = 0
                self._loop(writer)
                if self._stopping.is_set():
                    break
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                # (before OperationalError, their base class)
                if self._streams:
                    # Probably waiting on one of our own streamed transactions: replay the
                    # stream without streaming (see the module docstring).
                    self.stream_conflict = True
                self._down(f"lock conflict: {exc}")
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._down(f"connection lost: {exc}")
            except (psycopg.Error, CdcSyncError) as exc:
                self._down(f"apply failed: {exc}")
            finally:
                self._close_streams()
                try:
                    writer.conn.close()
                except Exception:
                    pass
            failures += 1
            self._sleep(failures)
        self.connected = False

    def _down(self, reason: str) -> None:
        self._accepting = False
        self._missed = True  # whatever was queued or not yet committed must be replayed
        self.connected = False
        self.last_error = mask_dsn(" ".join(reason.split()))
        log.warning("site %s: %s; retrying", self.site, self.last_error)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                item = self._get(0)
                if isinstance(item, _Stop):
                    self._stopping.set()
        except queue.Empty:
            pass

    # -- streamed transactions ---------------------------------------------------------------
    def _stream_writer(self) -> _StreamWriter:
        if self._spare:
            return self._spare.pop()
        used = {s.conn.index for s in self._streams.values()}
        index = next(i for i in range(1, len(used) + 2) if i not in used)
        opts = self.options
        if opts.origin:
            opts = replace(opts, origin=f"{opts.origin}#{index}")
        conn = connect_site(self.dsn, application_name=f"cdc_sync:{self.source}:stream")
        try:
            sw = _StreamWriter(SiteWriter(conn, self.source, options=opts), index)
            sw.writer.set_lock_timeout(STREAM_LOCK_TIMEOUT_MS)
        except BaseException:
            conn.close()
            raise
        return sw

    def _release(self, sw: _StreamWriter) -> None:
        sw.writer.rollback()
        if len(self._spare) < SPARE_STREAM_WRITERS:
            self._spare.append(sw)
        else:
            _close_quietly(sw.writer)

    def _abandon_streams(self, main: SiteWriter) -> None:
        """Roll back every open streamed transaction (the stream restarts or stops); `main`
        must be between transactions."""
        streams, self._streams = self._streams, {}
        for st in streams.values():
            try:
                self._release(st.conn)
            except psycopg.Error:
                _close_quietly(st.conn.writer)
        if streams:
            main.set_lock_timeout(0)

    def _close_streams(self) -> None:
        streams, self._streams = self._streams, {}
        spare, self._spare = self._spare, []
        for sw in [st.conn for st in streams.values()] + spare:
            _close_quietly(sw.writer)

    def _stream_changes(self, main: SiteWriter, item: TxStreamChanges) -> None:
        st = self._streams.get(item.xid)
        if st is None:
            if not self._streams:
                main.set_lock_timeout(STREAM_LOCK_TIMEOUT_MS)
            sw = self._stream_writer()
            st = _OpenStream(sw, TxBegin(item.xid, INVALID_LSN, datetime.now(UTC), None),
                             started=time.monotonic())
            self._streams[item.xid] = st
            sw.writer.begin()
        w = st.conn.writer
        if item.subxid != item.xid and item.subxid not in st.savepoints:
            w.savepoint(f"cdc_sub_{item.subxid}")
            st.savepoints.append(item.subxid)
        st.changes += self._counted(w, lambda: w.apply(item.changes, st.begin))

    def _stream_abort(self, main: SiteWriter, item: TxStreamAbort) -> None:
        st = self._streams.get(item.xid)
        if st is None:
            return
        if item.subxid == item.xid:
            self._end_stream(main, item.xid)
        elif item.subxid in st.savepoints:
            at = st.savepoints.index(item.subxid)
            st.conn.writer.rollback_to(f"cdc_sub_{item.subxid}")
            del st.savepoints[at:]

    def _stream_commit(self, main: SiteWriter, item: TxStreamCommit, accepted: Lsn) -> bool:
        """Commit a streamed transaction (main must be idle); False if it was already applied."""
        st = self._streams.get(item.xid)
        if st is None:
            return False
        applied = item.commit_lsn >= accepted
        if applied:
            self._commit(st.conn.writer, item.end_lsn, item.commit_ts, st.changes, st.started)
        self._end_stream(main, item.xid)
        return applied

    def _end_stream(self, main: SiteWriter, xid: int) -> None:
        """Forget streamed transaction `xid` (its connection rolls back what it did not commit);
        with no stream left open, `main` waits for locks without limit again."""
        st = self._streams.pop(xid)
        self._release(st.conn)
        if not self._streams:
            main.set_lock_timeout(0)

    def _commit(self, writer: SiteWriter, lsn: Lsn, commit_ts: datetime, changes: int,
                started: float) -> None:
        """Commit `writer`'s target transaction at source position `lsn`, and account for it
        (chunks sent ahead are settled by the commit: count their dead letters)."""
        self._counted(writer, lambda: writer.commit(lsn, commit_ts))
        self.durable_lsn = lsn
        self.last_commit_ts = commit_ts
        self.on_applied(self, changes, time.monotonic() - started)
        self.applied_changes += changes

    def _retry(self, writer: SiteWriter,
               kept: list[tuple[list[tuple[TxBegin, tuple[Change, ...]]], bool]],
               exc: psycopg.Error) -> int:
        """The server broke a deadlock (or a lock wait timed out) in the open target
        transaction: roll back just that transaction and apply what it held again, after a
        short randomised pause (the other party, a local writer, gets through meanwhile).
        Our own replicators never take part in such a cycle (`_locks`). Gives up after
        RETRY_ATTEMPTS (the error then propagates: reconnect and replay)."""
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            self.lock_retries += 1
            log.info("site %s: %s; retrying the target transaction (attempt %d)", self.site,
                     " ".join(str(exc).split()), attempt)
            writer.rollback()
            self._stopping.wait(backoff_delay(attempt, RETRY_PAUSE, 1.0, jitter="full"))
            writer.begin()
            applied = 0
            try:
                for segments, final in kept:
                    applied += self._counted(writer, partial(writer.apply_segments, segments,
                                                             final=final))
            except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable) as again:
                exc = again
                continue
            return applied
        raise exc

    def _counted(self, writer: SiteWriter, work: Callable[[], T]) -> T:
        """Run `work` on `writer`; add the dead letters and conflicts it logged to ours."""
        before = writer.dead_letters, writer.conflicts
        result = work()
        self.dead_letters += writer.dead_letters - before[0]
        self.conflicts += writer.conflicts - before[1]
        return result

    def _sleep(self, failures: int) -> None:
        self._stopping.wait(backoff_delay(failures, BACKOFF_INITIAL, BACKOFF_MAX, jitter="equal"))

    def _loop(self, writer: SiteWriter) -> None:
        accepted = self.durable_lsn or Lsn(0)
        in_src_tx = skipping = False
        pending: tuple[Lsn, datetime] | None = None
        pending_keepalive: Lsn | None = None
        target_changes = 0
        target_started = 0.0
        current: TxBegin | None = None
        last_check = time.monotonic()  # of the site connection, when idle (see below)

        # Changes of consecutive small transactions are applied together (see
        # `SiteWriter.apply_segments`): buffered until FLUSH_CHANGES or the target commit.
        buffer: list[tuple[TxBegin, tuple[Change, ...]]] = []
        buffered = 0

        # What the open target transaction has applied, kept (up to RETRY_KEEP_CHANGES) so that
        # a deadlock with a local writer retries just this target transaction (`_retry`).
        kept: list[tuple[list[tuple[TxBegin, tuple[Change, ...]]], bool]] = []
        kept_changes = 0
        counters_at_begin = (self.dead_letters, self.conflicts)

        def forget_kept() -> None:
            nonlocal kept, kept_changes, counters_at_begin
            kept, kept_changes = [], 0
            counters_at_begin = (self.dead_letters, self.conflicts)

        def flush(final: bool = False) -> None:
            nonlocal buffer, buffered, target_changes, kept_changes
            if buffer:
                segments = buffer
                buffer, buffered = [], 0
                kept.append((segments, final))
                kept_changes += sum(len(chs) for _b, chs in segments)
                try:
                    target_changes += self._counted(
                        writer, lambda: writer.apply_segments(segments, final=final))
                except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable) as exc:
                    if self._streams or kept_changes > RETRY_KEEP_CHANGES:
                        raise
                    self.dead_letters, self.conflicts = counters_at_begin
                    target_changes = self._retry(writer, kept, exc)

        def drop_buffer() -> None:
            nonlocal buffer, buffered
            buffer, buffered = [], 0

        def commit_target() -> None:
            nonlocal pending, pending_keepalive, target_changes
            flush(final=True)
            if pending is not None:
                self._commit(writer, pending[0], pending[1], target_changes, target_started)
            else:
                writer.rollback()
            forget_kept()
            if pending_keepalive is not None and self.durable_lsn is not None:
                self.durable_lsn = max(self.durable_lsn, pending_keepalive)
            pending, pending_keepalive, target_changes = None, None, 0

        while True:
            if self._detached:
                # Commit what is complete, forget the rest, and have the stream replayed.
                if writer.in_transaction and not in_src_tx:
                    commit_target()
                drop_buffer()
                writer.rollback()
                self._abandon_streams(writer)
                self._detached = False
                self._drain()
                in_src_tx = skipping = False
                pending = pending_keepalive = None
                target_changes = 0
                self._awaiting_reset = True
                self._accepting = True
                self.on_rewind(self)
                continue
            timeout: float | None = None
            if writer.in_transaction and not in_src_tx:
                timeout = max(0.0, target_started + self.group_max_seconds - time.monotonic())
            elif not writer.in_transaction:
                # Idle: notice a lost site connection now (status shows it, and the worker
                # reconnects), not with the next change.
                if time.monotonic() - last_check >= self.idle_check_seconds:
                    writer.ping()
                    last_check = time.monotonic()
                timeout = max(0.0, last_check + self.idle_check_seconds - time.monotonic())
            if self._stopping.is_set():
                # stop() could not queue _STOP on a full queue: stop once it is drained.
                timeout = 0.2 if timeout is None else min(timeout, 0.2)
            try:
                item = self._get(timeout)
            except queue.Empty:
                if self._stopping.is_set():
                    item = _STOP
                elif writer.in_transaction:
                    commit_target()
                    continue
                else:
                    continue  # time for the idle check
            if isinstance(item, _Stop):
                if writer.in_transaction and not in_src_tx:
                    commit_target()
                drop_buffer()
                writer.rollback()
                self._abandon_streams(writer)
                return
            if isinstance(item, Reset):
                drop_buffer()
                writer.rollback()
                self._abandon_streams(writer)
                self._awaiting_reset = False
                in_src_tx = skipping = False
                pending = pending_keepalive = None
                target_changes = 0
                accepted = self.durable_lsn or Lsn(0)
                continue
            if self._awaiting_reset:
                continue
            if isinstance(item, TxBegin):
                if item.commit_lsn < accepted:
                    skipping = True
                    continue
                in_src_tx = True
                current = item
                if not writer.in_transaction:
                    writer.begin()
                    forget_kept()
                    target_started = time.monotonic()
            elif isinstance(item, TxChanges):
                if in_src_tx and current is not None:
                    buffer.append((current, item.changes))
                    buffered += len(item.changes)
                    if buffered >= FLUSH_CHANGES:
                        flush()
            elif isinstance(item, TxCommit):
                if skipping:
                    skipping = False
                    continue
                if not in_src_tx:
                    continue
                in_src_tx = False
                accepted = item.end_lsn
                pending = (item.end_lsn, item.commit_ts)
                if (
                    not self.group_transactions
                    or self.idle()
                    or target_changes + buffered >= self.group_max_changes
                    or time.monotonic() - target_started >= self.group_max_seconds
                ):
                    commit_target()
            elif isinstance(item, TxStreamChanges):
                # Earlier transactions first: their rows must be released before the
                # streamed one takes them (see the module docstring).
                if writer.in_transaction:
                    commit_target()
                self._stream_changes(writer, item)
            elif isinstance(item, TxStreamCommit):
                if writer.in_transaction:
                    commit_target()
                if self._stream_commit(writer, item, accepted):
                    accepted = item.end_lsn
            elif isinstance(item, TxStreamAbort):
                if writer.in_transaction and item.subxid == item.xid:
                    commit_target()
                self._stream_abort(writer, item)
            elif isinstance(item, Keepalive):
                if in_src_tx or skipping:
                    continue
                if writer.in_transaction:
                    # The source has sent everything up to here: unless more is already queued
                    # (a keepalive also stands for a skipped transaction of another office: in
                    # a mesh, two in three), no transaction is on its way to join the open
                    # group, so it commits now, not at group_max_seconds.
                    pending_keepalive = item.wal_end
                    if (self.idle() or target_changes + buffered >= self.group_max_changes
                            or time.monotonic() - target_started >= self.group_max_seconds):
                        commit_target()
                elif self.durable_lsn is not None and item.wal_end > self.durable_lsn:
                    self.durable_lsn = item.wal_end


def _changes_in(item: object) -> int:
    if isinstance(item, TxChanges | TxStreamChanges):
        return len(item.changes)
    return 0


def _close_quietly(writer: SiteWriter) -> None:
    try:
        writer.conn.close()
    except Exception:
        pass

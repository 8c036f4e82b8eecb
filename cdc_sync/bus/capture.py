"""`Capture`: the source's slot → JetStream (`cdc-sync capture`).

Contract:
- Reads the slot without streaming in-progress transactions (the WAL sender spills a large
  transaction to its own disk and sends it at commit), packs small transactions into one
  message and cuts large ones into chunks as they are read (`Chunker`), and publishes them
  with JetStream's async publish: a huge transaction is never whole in memory here. A pack is
  sent once full, or as soon as capture has read everything the source sent (so a lone
  transaction waits for nothing).
- The stream holds every transaction once, in commit order. A session starts after the
  stream's last message (`BusClient.tail`, `Resume`): what the slot sends again and the stream
  has is not published again, however it was packed before. Every message expects the one
  capture published before it to be the stream's last (`BusClient.publish`), so a message lost
  or refused on the way makes JetStream refuse the ones after it, and the session starts over.
- Confirms to the source (standby status `flush`) only the end of transactions whose every
  chunk JetStream acknowledged as stored, in order; between transactions, once everything is
  acknowledged, the last keepalive position too. The source's WAL is released as fast as the
  bus takes it, whatever the sites do.
- Transactions carrying a replication origin are not published unless `[source]
  forward_origins` (multi-directional loop prevention, as in-process).
- A lost source connection, an unreachable bus or an acknowledgement that does not come
  within `ACK_TIMEOUT` (or a refused one) ends the session: capture waits (with backoff) and
  reads again from the slot's confirmed position, after the stream's end. It never exits for
  that. `stop()` ends it after waiting for outstanding acknowledgements.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Final

from ..backoff import backoff_delay
from ..config import Settings
from ..errors import CdcSyncError
from ..protocol import XLOG_DATA_HEADER_SIZE, Lsn, PrimaryKeepalive
from ..source.monitor import HEARTBEAT_PREFIX, SourceMonitor
from ..source.stream import ReplicationStream, SlotBusy, StreamLost
from ._format import Chunk, Chunker, Resume
from .client import BusClient, BusError, BusStreamError

__all__ = ["Capture"]

log = logging.getLogger(__name__)

STATUS_INTERVAL: Final = 1.0
ACK_TIMEOUT: Final = 30.0
RECONNECT_INITIAL: Final = 0.5
RECONNECT_MAX: Final = 10.0
_XLOG_DATA: Final = ord("w")
_HEARTBEAT: Final = HEARTBEAT_PREFIX.encode()


class Capture:
    """Publishes the source of `settings` to its stream until `stop()` (module docstring)."""

    def __init__(self, settings: Settings, *, client: BusClient | None = None) -> None:
        if settings.bus is None:
            raise CdcSyncError("capture needs a [bus] section in the configuration")
        self.settings = settings
        self.client = client or BusClient(settings.bus, settings.source.name)
        self._own_client = client is None
        self._stop = threading.Event()
        self.monitor = SourceMonitor(settings.source.dsn, settings.source.slot)
        self.confirmed_lsn = Lsn(0)
        self.received_lsn = Lsn(0)
        self.published = 0  # chunks acknowledged by JetStream
        self.connected = False
        self.bus_connected = False
        self.last_error: str | None = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    if not self.bus_connected:
                        self.client.connect()
                        self.client.ensure_stream()
                        self.bus_connected = True
                    self._session()
                    failures = 0
                except SlotBusy as exc:
                    self._note(exc)
                except BusStreamError:
                    raise  # a stream that is not ours: no retry makes it ours
                except (StreamLost, BusError) as exc:
                    self._note(exc)
                if self._stop.is_set():
                    break
                failures += 1
                self._stop.wait(backoff_delay(failures, RECONNECT_INITIAL, RECONNECT_MAX,
                                              jitter="equal"))
        finally:
            self.monitor.close()
            if self._own_client:
                self.client.close()

    def _note(self, exc: CdcSyncError) -> None:
        self.last_error = str(exc)
        log.warning("%s; retrying", exc)

    def _session(self) -> None:
        source = self.settings.source
        forward = source.forward_origins
        stream = ReplicationStream(source.dsn, source.slot, source.publication,
                                   origin_none=not forward, streaming=False,
                                   decoding_work_mem=source.decoding_work_mem, coalesce=True)
        self.client.abandon_acks()  # of an earlier session: what they were for is read again
        after: int | str
        after, tail = self.client.tail()
        chunker = Chunker(drop_origins=not forward, resume=Resume.of(tail))
        # Chunks published, oldest first, with the end LSN of the transaction a chunk ends.
        pending: deque[tuple[concurrent.futures.Future[int], int | None, float]] = deque()
        idle_end = Lsn(0)
        last_status = last_data = 0.0
        try:
            stream.open(Lsn(0))
            self.connected, self.last_error = True, None
            log.info("capture: reading slot %s into stream %s", source.slot, self.client.stream)
            while not self._stop.is_set():
                reply = False
                chunks: list[Chunk] = []
                for raw in stream.read_raw(0.2):
                    if raw[0] != _XLOG_DATA or len(raw) < XLOG_DATA_HEADER_SIZE:
                        frame = stream.decode_frame(raw)
                        if isinstance(frame, PrimaryKeepalive):
                            self.received_lsn = max(self.received_lsn, frame.wal_end)
                            reply = reply or frame.reply_requested
                            if not chunker.in_transaction:
                                idle_end = max(idle_end, frame.wal_end)
                        continue
                    data = raw[XLOG_DATA_HEADER_SIZE:]
                    if (not chunker.in_transaction and data[:1] == b"M"
                            and data[10:10 + len(_HEARTBEAT)] == _HEARTBEAT):
                        continue  # only there to make the slot advance
                    last_data = time.monotonic()
                    chunks.extend(chunker.feed(data))
                chunks.extend(chunker.flush())  # all the source sent so far is read
                if chunks:
                    now = time.monotonic()
                    futures = self.client.publish(chunks, after)
                    after = chunks[-1].msg_id  # the next message follows this one
                    for chunk, fut in zip(chunks, futures, strict=True):
                        pending.append((fut, chunk.end_lsn, now))
                self._settle(pending)
                if not chunker.in_transaction and not chunker.buffered and not pending:
                    skipped = Lsn(chunker.skipped_end or 0)
                    self.confirmed_lsn = max(self.confirmed_lsn, idle_end, skipped)
                now = time.monotonic()
                if reply or now - last_status >= STATUS_INTERVAL:
                    stream.send_status(self.received_lsn, self.confirmed_lsn, self.confirmed_lsn)
                    last_status = now
                if now - last_data >= source.heartbeat_seconds:
                    self.monitor.heartbeat()
                    last_data = now
            # stopping: wait for what is in flight, confirm it, end the COPY cleanly
            deadline = time.monotonic() + ACK_TIMEOUT
            while pending and time.monotonic() < deadline:
                self._settle(pending)
                time.sleep(0.01)
            if stream.finish(self.confirmed_lsn):
                log.info("capture stopped; confirmed %s to the source", self.confirmed_lsn)
        finally:
            self.connected = False
            stream.close()

    def _settle(self, pending: deque[tuple[concurrent.futures.Future[int], int | None,
                                           float]]) -> None:
        """Confirm the ends of transactions whose chunks are all acknowledged, in order."""
        now = time.monotonic()
        while pending:
            fut, end, at = pending[0]
            if not fut.done():
                if now - at > ACK_TIMEOUT:
                    raise BusError(f"bus: no acknowledgement from {self.client.where} within "
                                   f"{ACK_TIMEOUT:g} s")
                return
            exc = fut.exception()
            if exc is not None:
                raise exc if isinstance(exc, BusError) else BusError(f"bus: {exc}")
            pending.popleft()
            self.published += 1
            if end is not None:
                self.confirmed_lsn = max(self.confirmed_lsn, Lsn(end))

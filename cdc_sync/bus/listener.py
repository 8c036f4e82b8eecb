"""`BusListener`: a source's transactions read from its JetStream stream for `RealTimeSync`.

Contract:
- `BusListener(settings, on_item).run()` reads the stream of `settings`' source from the
  message after the last one stored when it started (live events, like the in-process
  listener: not durable) and calls `on_item` with every `TxItem` decoded, in stream order, on
  the thread that runs it, until `stop()`. It needs no slot and no site: capture (`cdc-sync
  capture` or `run` with `[bus]`) runs elsewhere.
- A lost bus is retried (with backoff, logged once per outage); reading resumes after the last
  message taken, so within one process no message is delivered twice. A transaction cut short
  (capture died mid-way) and sent again starts with a new Begin: `RealTimeSync` drops the
  partial one and, from its commit LSN, does not dispatch a transaction twice.
- A message that is not ours, or of another format, is logged with its sequence and skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final

from ..backoff import backoff_delay
from ..changes import Assembler, TxItem
from ..config import Settings
from ..errors import CdcSyncError
from ..protocol import ROW_TAGS, ProtocolError, decode_message
from ._format import (
    FORMAT_VERSION,
    HEADER_CHUNK,
    HEADER_FORMAT,
    READABLE_FORMATS,
    BusFormatError,
    decode_body,
)
from .client import BusClient, BusError

__all__ = ["BusListener"]

log = logging.getLogger(__name__)

# Messages are at most about CHUNK_BYTES (512 KiB): 64 of them stay far below nats-py's
# 256 MiB of pending bytes per subscription, beyond which it drops messages (slow consumer).
FETCH_BATCH: Final = 64
FETCH_TIMEOUT: Final = 0.5
RETRY_INITIAL: Final = 0.5
RETRY_MAX: Final = 10.0


class BusListener:
    """Feeds a source's stream to `on_item` (see the module docstring)."""

    def __init__(self, settings: Settings, on_item: Callable[[TxItem], None]) -> None:
        if settings.bus is None:
            raise CdcSyncError("a bus listener needs a [bus] section in the configuration")
        self.client = BusClient(settings.bus, settings.source.name)
        self.on_item = on_item
        self._halt = threading.Event()
        self.next_seq: int | None = None  # the next message to read; None: not started
        self.bad_messages = 0
        self.ready = threading.Event()  # set once reading from the stream
        self._connected = False

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        failures = 0
        try:
            while not self._halt.is_set():
                try:
                    self._session()
                    failures = 0
                except BusError as exc:
                    if failures == 0:
                        log.warning("bus listener: %s; retrying", exc)
                    failures += 1
                if failures:
                    self._halt.wait(backoff_delay(failures, RETRY_INITIAL, RETRY_MAX,
                                                  jitter="equal"))
        finally:
            self.client.close()

    def _session(self) -> None:
        if not self._connected:
            self.client.connect()
            self._connected = True
        if self.next_seq is None:
            self.next_seq = self.client.ensure_stream(adjust=False).last_seq + 1
        assembler = Assembler()
        consumer = self.client.consumer(self.next_seq)
        self.ready.set()
        tx_first = self.next_seq
        try:
            while not self._halt.is_set():
                for msg in consumer.fetch(FETCH_BATCH, FETCH_TIMEOUT):
                    # Resume after what was taken whole; inside a transaction, from its first
                    # chunk (its Begin comes again and replaces what was delivered of it).
                    self.next_seq = tx_first if assembler.in_transaction else msg.seq
                    h = msg.headers
                    if h.get(HEADER_FORMAT) not in READABLE_FORMATS or HEADER_CHUNK not in h:
                        self._bad(msg.seq, f"is not a cdc-sync message of format {FORMAT_VERSION}")
                        self.next_seq = tx_first if assembler.in_transaction else msg.seq + 1
                        continue
                    chunk = int(h[HEADER_CHUNK])
                    if chunk == 0:
                        if assembler.in_transaction:
                            assembler.reset()  # cut short, and sent again from its start
                        tx_first = msg.seq
                    elif not assembler.in_transaction:
                        self.next_seq = msg.seq + 1
                        continue  # the rest of a transaction begun before we started
                    try:
                        items = [item for frame in decode_body(msg.data) for item in
                                 (assembler.feed_row(frame) if frame[0] in ROW_TAGS
                                  else assembler.feed(decode_message(frame), len(frame)))]
                    except (BusFormatError, ProtocolError) as exc:
                        self._bad(msg.seq, f"cannot be decoded ({exc})")
                        assembler.reset()  # its transaction is dropped whole
                        self.next_seq = msg.seq + 1
                        continue
                    for item in items:
                        self.on_item(item)
                    self.next_seq = tx_first if assembler.in_transaction else msg.seq + 1
        finally:
            consumer.close()

    def _bad(self, seq: int, why: str) -> None:
        self.bad_messages += 1
        log.error("bus listener: stream %s message %d %s: skipped", self.client.stream, seq, why)

"""`RealTimeSync`: the in-process Python API — run the replicator, subscribe to changes, emit.

Contract:

- `RealTimeSync(config=None, *, sources=None)`: `config` is a TOML path or a `Settings`
  (None: the usual lookup, `$CDC_SYNC_CONFIG` then `./cdc-sync.toml`); `sources` are fnmatch
  patterns over event topics ("public.orders", "public.*", emitted topics such as "orders.paid");
  only those are ever converted and dispatched (default: everything).
- `start()` runs the whole pipeline (source → sites, outbox) in a background thread with this
  object as an in-process listener; `stop()` stops it and waits; also a context manager.
- With a `[bus]` section, `start()` runs no pipeline: it reads the source's JetStream stream
  from its end (`cdc_sync.bus.listener`), so an application on any machine that reaches the
  bus gets the same events in the same order while capture runs elsewhere (`cdc-sync capture`,
  or `run` with `[bus]`). The rest of this contract holds as written.
- `subscribe(pattern, handler) -> unsubscribe`: `handler(event: ChangeEvent)` for every event
  whose topic matches `pattern` (fnmatch, case-sensitive). Handlers run on the pipeline's
  listener thread for this object, one event at a time, in source commit order, in
  subscription order per event. The events of a transaction are dispatched when its commit
  arrives, so a transaction cut off by a lost source connection is dropped and seen whole
  when it is streamed again; a transaction streamed again after a reconnect (commit LSN not
  above the last one dispatched) is not dispatched twice within one process. Only the
  events of topics someone subscribed to (and within `sources`) are built and buffered.
  A handler that raises is logged (`logger.exception`) and neither stops the other handlers
  nor the stream. Delivery is live,
  not durable: after a restart the stream resumes where the sites are, so use the outbound
  table and connectors for at-least-once delivery. A slow handler holds back the listener's
  bounded queue, and through it the stream: keep handlers quick or hand work off.
- `ChangeEvent`: `id, source, topic, op, table, key, data, old, lsn, commit_ts` — the
  `cdc_sync.events.Event` of the change with `data` = `row` (the new row; the payload for a
  message) except for a delete, where `data` is the old row as sent (the key columns, or the
  whole row with REPLICA IDENTITY FULL); truncate: None. `commit_ts` is an aware UTC
  `datetime`, `lsn` the commit LSN text "X/Y". Values are typed as in `cdc_sync.events`.
- `emit_change(topic, data, *, connection=None) -> str` writes
  `pg_logical_emit_message(true, 'cdc_sync:' || topic, <data as JSON>)` at the source and
  returns its LSN text. With `connection` (the application's psycopg connection) it runs in
  that connection's current transaction and commits or rolls back with it — a rolled-back
  message never reaches the stream (logical decoding drops aborted transactions); without,
  it uses a short autocommit connection to the source DSN. `topic` must be a non-empty
  string without NUL; `data` a JSON-serialisable mapping (NaN/Infinity rejected). The
  module-level `emit_change(connection, topic, data)` does the same for applications that do
  not run the replicator.
- `AsyncRealTimeSync`: the same for asyncio — `await start()/stop()` (in a thread), `async with`,
  `subscribe` accepting coroutine functions too (run on the event loop that called `start`,
  awaited in order), `await emit_change(..., connection=<psycopg.AsyncConnection>)`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import itertools
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .changes import TxBegin, TxChanges, TxCommit, TxItem
from .config import Settings, load_settings, table_matches
from .errors import SourceError, dsn_label, mask_dsn
from .events import EMIT_PREFIX, event_dicts
from .protocol import Lsn

__all__ = ["AsyncRealTimeSync", "ChangeEvent", "RealTimeSync", "emit_change"]

log = logging.getLogger(__name__)

Handler = Callable[["ChangeEvent"], object]
AsyncHandler = Callable[["ChangeEvent"], object | Awaitable[object]]

_EMIT_SQL: Final = "SELECT pg_logical_emit_message(true, %s::text, %s::text)::text"
CONNECT_TIMEOUT: Final = 10


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change as a subscriber sees it (see the module docstring)."""

    id: str
    source: str
    topic: str
    op: str
    table: str | None
    key: dict[str, Any] | None
    data: dict[str, Any] | None
    old: dict[str, Any] | None
    lsn: str
    commit_ts: datetime

    @classmethod
    def from_event(cls, event: Mapping[str, Any], commit_ts: datetime) -> ChangeEvent:
        """From an `Event.as_dict()` dict and the transaction's commit time."""
        op = event["op"]
        data = event["old"] if op == "delete" else event["row"]
        return cls(id=event["id"], source=event["source"], topic=event["topic"], op=op,
                   table=event["table"], key=event["key"], data=data, old=event["old"],
                   lsn=event["lsn"], commit_ts=commit_ts)


# -- emitting ----------------------------------------------------------------------------------

def _emit_params(topic: str, data: Mapping[str, Any]) -> tuple[str, str]:
    if not isinstance(topic, str) or not topic:
        raise ValueError("topic must be a non-empty string")
    if "\x00" in topic:
        raise ValueError("topic must not contain NUL")
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping (a JSON object), not {type(data).__name__}")
    try:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data is not JSON-serialisable: {exc}") from None
    if "\\u0000" in payload:
        raise ValueError("data must not contain NUL characters")
    return EMIT_PREFIX + topic, payload


def emit_change(connection: psycopg.Connection[Any], topic: str, data: Mapping[str, Any]) -> str:
    """Emit `data` under `topic` inside `connection`'s current transaction; the LSN text."""
    prefix, payload = _emit_params(topic, data)
    row = connection.execute(_EMIT_SQL, (prefix, payload)).fetchone()
    assert row is not None
    return str(row[0])


def _emit_autocommit(dsn: str, topic: str, data: Mapping[str, Any]) -> str:
    prefix, payload = _emit_params(topic, data)
    extra: dict[str, Any] = {}
    try:
        if "connect_timeout" not in conninfo_to_dict(dsn):
            extra["connect_timeout"] = CONNECT_TIMEOUT
    except psycopg.Error:
        pass
    try:
        with psycopg.connect(dsn, autocommit=True, application_name="cdc_sync:emit",
                             **extra) as conn:
            row = conn.execute(_EMIT_SQL, (prefix, payload)).fetchone()
    except psycopg.Error as exc:
        detail = mask_dsn(" ".join(str(exc).split()))
        raise SourceError(f"source {dsn_label(dsn)}: emit_change failed: {detail}") from exc
    assert row is not None
    return str(row[0])


# -- the synchronous API -----------------------------------------------------------------------

class RealTimeSync:
    """Runs the replicator in-process and dispatches its changes (see the module docstring)."""

    def __init__(self, config: str | Path | Settings | None = None, *,
                 sources: Sequence[str] | None = None) -> None:
        self.settings = config if isinstance(config, Settings) else load_settings(config)
        if isinstance(sources, str):
            sources = (sources,)
        self.sources: tuple[str, ...] | None = tuple(sources) if sources is not None else None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._subs: dict[int, tuple[str, Handler]] = {}
        self._tokens = itertools.count()
        self._topic_handlers: dict[str, tuple[Handler, ...]] = {}
        self._pipeline: Any = None
        self._thread: threading.Thread | None = None
        # listener state (touched only by the listener thread)
        self._begin: TxBegin | None = None
        self._pending: list[ChangeEvent] = []
        self._last_lsn = Lsn(0)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the pipeline in a background thread (once)."""
        from .pipeline import Pipeline

        with self._lock:
            if self._thread is not None:
                raise RuntimeError("RealTimeSync already started")
            if self.settings.bus is not None:
                from .bus.listener import BusListener

                self._pipeline = BusListener(self.settings, self._on_item)
            else:
                self._pipeline = Pipeline(self.settings, listeners=[self._on_item])
            self._thread = threading.Thread(target=self._run, name="cdc_sync-realtime",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._pipeline.run()
        except BaseException as exc:  # reported through .error, and logged
            self.error = exc
            log.exception("the replication pipeline stopped")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the pipeline and wait for it (at most `timeout` seconds)."""
        with self._lock:
            pipeline, thread = self._pipeline, self._thread
        if pipeline is not None:
            pipeline.stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> RealTimeSync:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- subscriptions ------------------------------------------------------------------------
    def subscribe(self, pattern: str, handler: Handler) -> Callable[[], None]:
        """Call `handler(event)` for events whose topic matches `pattern`; returns a function
        that unsubscribes (idempotent)."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("pattern must be a non-empty string")
        if not callable(handler):
            raise TypeError("handler must be callable")
        with self._lock:
            token = next(self._tokens)
            self._subs[token] = (pattern, handler)
            self._topic_handlers = {}

        def unsubscribe() -> None:
            with self._lock:
                if self._subs.pop(token, None) is not None:
                    self._topic_handlers = {}

        return unsubscribe

    def _handlers(self, topic: str) -> tuple[Handler, ...]:
        cache = self._topic_handlers
        handlers = cache.get(topic)
        if handlers is None:
            with self._lock:
                if self.sources is not None and not table_matches(self.sources, topic):
                    handlers = ()
                else:
                    handlers = tuple(h for p, h in self._subs.values()
                                     if fnmatch.fnmatchcase(topic, p))
                if cache is self._topic_handlers:
                    cache[topic] = handlers
        return handlers

    def _wanted(self, topic: str) -> bool:
        return bool(self._handlers(topic))

    # -- the listener -------------------------------------------------------------------------
    def _on_item(self, item: TxItem) -> None:
        """The pipeline listener: every stream item, in order, on one thread."""
        if isinstance(item, TxBegin):
            # A new Begin also discards a transaction abandoned half-way (lost connection).
            self._pending = []
            self._begin = None if item.commit_lsn <= self._last_lsn else item
        elif isinstance(item, TxChanges):
            begin = self._begin
            if begin is None:
                return
            ts = begin.commit_ts
            self._pending.extend(
                ChangeEvent.from_event(d, ts) for d in
                event_dicts(self.settings.source.name, begin, item.changes, wanted=self._wanted))
        elif isinstance(item, TxCommit):
            begin, pending = self._begin, self._pending
            self._begin, self._pending = None, []
            if begin is None:
                return
            self._last_lsn = max(self._last_lsn, begin.commit_lsn)
            for event in pending:
                self._dispatch(event)

    def _dispatch(self, event: ChangeEvent) -> None:
        for handler in self._handlers(event.topic):
            try:
                handler(event)
            except Exception:
                log.exception("subscriber %s failed on event %s",
                              getattr(handler, "__qualname__", repr(handler)), event.id)

    # -- emitting -----------------------------------------------------------------------------
    def emit_change(self, topic: str, data: Mapping[str, Any], *,
                    connection: psycopg.Connection[Any] | None = None) -> str:
        """Emit a `message` event (see the module docstring); returns its LSN text."""
        if connection is not None:
            return emit_change(connection, topic, data)
        return _emit_autocommit(self.settings.source.dsn, topic, data)


# -- asyncio -----------------------------------------------------------------------------------

class AsyncRealTimeSync:
    """`RealTimeSync` for asyncio applications (see the module docstring)."""

    def __init__(self, config: str | Path | Settings | None = None, *,
                 sources: Sequence[str] | None = None) -> None:
        self.sync = RealTimeSync(config, sources=sources)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.sync.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.sync.stop)

    async def __aenter__(self) -> AsyncRealTimeSync:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def subscribe(self, pattern: str, handler: AsyncHandler) -> Callable[[], None]:
        """Like `RealTimeSync.subscribe`; a coroutine function runs on the loop that called
        `start()`, and the next event waits for it (commit order is kept)."""
        if not inspect.iscoroutinefunction(handler):
            return self.sync.subscribe(pattern, handler)

        def run_on_loop(event: ChangeEvent) -> None:
            loop = self._loop
            if loop is None or loop.is_closed():
                raise RuntimeError("AsyncRealTimeSync: no running event loop (call start())")
            coro = handler(event)
            assert inspect.isawaitable(coro)
            future = asyncio.run_coroutine_threadsafe(_awaited(coro), loop)
            while True:
                try:
                    future.result(timeout=1.0)
                    return
                except TimeoutError:
                    if loop.is_closed() or not loop.is_running():
                        future.cancel()
                        raise RuntimeError("AsyncRealTimeSync: the event loop stopped") from None

        run_on_loop.__qualname__ = getattr(handler, "__qualname__", "handler")
        return self.sync.subscribe(pattern, run_on_loop)

    async def emit_change(self, topic: str, data: Mapping[str, Any], *,
                          connection: psycopg.AsyncConnection[Any] | None = None) -> str:
        """`RealTimeSync.emit_change`; `connection` is an application's `AsyncConnection`."""
        if connection is None:
            return await asyncio.to_thread(self.sync.emit_change, topic, data)
        prefix, payload = _emit_params(topic, data)
        cur = await connection.execute(_EMIT_SQL, (prefix, payload))
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


async def _awaited(value: Awaitable[object]) -> object:
    return await value

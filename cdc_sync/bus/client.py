"""`BusClient`: a blocking facade over nats-py's JetStream for capture and the appliers.

Contract:
- nats-py is asyncio; cdc-sync's pipeline is threads. The client runs one event loop in a
  daemon thread and every method blocks the calling thread until its coroutine is done, so
  capture and the site feeders call it like psycopg.
- `connect()` reaches the servers within `CONNECT_TIMEOUT` seconds or raises `BusError` with
  one line (servers, never a token or password). `ensure_stream()` creates the stream (file
  storage, subjects `cdc.<source>.>`, the retention of `[bus]`) or checks an existing one: our
  subjects, file storage and limits retention (else `BusStreamError` naming the stream and
  the fix); its retention (`max_bytes`, `max_age_seconds`, `replicas`) is brought to what
  `[bus]` says, with a log line.
- `tail()` is the stream's last sequence and the headers of its last cdc-sync message (capture
  resumes after it). `publish(chunks, after)` sends chunks without waiting for each
  acknowledgement (with the chunk's `Nats-Msg-Id`), each one expecting the message before it
  to be the stream's last: the first `after` (a sequence: `Nats-Expected-Last-Sequence`, or the
  id of the message capture published before: `Nats-Expected-Last-Msg-Id`), the others the
  chunk before them. A message lost or refused makes JetStream refuse every later one, so the
  stream never holds transactions out of order or with a hole. One future per chunk resolves
  to its stream sequence once JetStream stored it (a refusal: `BusError`).
- `consumer(start_seq)` opens an ephemeral pull consumer delivering from `start_seq`; its
  `fetch(n, timeout)` returns `BusMessage`s (an empty list when none came in time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import ssl
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..config import BusSettings
from ..errors import CdcSyncError
from ._format import HEADER_TX, Chunk

__all__ = ["BusClient", "BusError", "BusMessage", "BusState", "BusStreamError", "subject_for"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0
REQUEST_TIMEOUT: Final = 10.0
DUPLICATE_WINDOW: Final = 600.0  # seconds: a capture restarted within this re-publishes unseen
MAX_PENDING_PUBLISHES: Final = 4000
TAIL_LOOKBACK: Final = 64  # messages read back from the stream's end for its last cdc-sync one
EXPECTED_LAST_SEQ: Final = "Nats-Expected-Last-Sequence"
EXPECTED_LAST_ID: Final = "Nats-Expected-Last-Msg-Id"
T = TypeVar("T")


class BusError(CdcSyncError):
    """The bus cannot be reached or used; the message is one line."""


class BusStreamError(BusError):
    """The stream exists with other subjects: a configuration problem, not a transient one."""


def subject_for(source: str) -> str:
    """The subject capture publishes `source`'s transactions to (`cdc.<source>.tx`; the
    stream holds `cdc.<source>.>`)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in source)
    return f"cdc.{safe}.tx"


@dataclass(frozen=True, slots=True)
class BusState:
    """The stream as JetStream reports it."""

    stream: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class BusMessage:
    seq: int
    headers: dict[str, str]
    data: bytes


class BusClient:
    """One connection to the bus for one source's stream (see the module docstring)."""

    def __init__(self, bus: BusSettings, source: str) -> None:
        self.settings = bus
        self.source = source
        self.stream = bus.stream_for(source)
        self.subject = subject_for(source)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bus-loop",
                                        daemon=True)
        self._thread.start()
        self._nc: Any = None
        self._js: Any = None
        self._ack_prefix: str | None = None
        self._ack_serial = 0
        self._acks: dict[str, concurrent.futures.Future[int]] = {}
        self._acks_drained = asyncio.Event()

    # -- plumbing --------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def where(self) -> str:
        return ", ".join(self.settings.servers)

    def connect(self) -> None:
        self._run(self._connect(), CONNECT_TIMEOUT + 5)

    async def _connect(self) -> None:
        import nats  # only commands that use the bus pay for importing nats

        bus = self.settings
        options: dict[str, Any] = {
            "servers": bus.servers, "connect_timeout": 2, "allow_reconnect": True,
            "max_reconnect_attempts": -1, "reconnect_time_wait": 1,
            "name": f"cdc-sync {self.source}",
        }
        if bus.creds_file:
            options["user_credentials"] = bus.creds_file
        if bus.token:
            options["token"] = bus.token
        if bus.user:
            options["user"], options["password"] = bus.user, bus.password
        if bus.tls_ca_file:
            options["tls"] = ssl.create_default_context(cafile=bus.tls_ca_file)

        refused: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            # nats-py reconnects after everything, a refused login too: that one is final.
            if not refused and _is_auth_error(exc):
                refused.append(exc)

        options["error_cb"] = on_error
        task = asyncio.ensure_future(_first_connect(nats, options))
        deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT
        try:
            while not task.done():
                if refused:
                    task.cancel()
                    raise BusError(f"bus: {self.where} refused the credentials: "
                                   f"{_one_line(refused[0])}")
                if asyncio.get_running_loop().time() > deadline:
                    task.cancel()
                    raise TimeoutError
                await asyncio.wait([task], timeout=0.05)
            self._nc = task.result()
        except TimeoutError:
            raise BusError(f"bus: cannot reach {self.where} within {CONNECT_TIMEOUT:g} s") from None
        except BusError:
            raise
        except Exception as exc:  # nats-py raises several kinds; one line each
            raise BusError(f"bus: cannot connect to {self.where}: {_one_line(exc)}") from None
        self._js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
        self._ack_prefix = None  # a new connection: a new inbox for acknowledgements

    @property
    def connected(self) -> bool:
        """Whether the connection to the bus is up now (nats-py reconnects on its own)."""
        return self._nc is not None and bool(self._nc.is_connected)

    def close(self) -> None:
        if self._nc is not None:
            try:
                self._run(self._nc.close(), 10)
            except Exception:  # closing a broken connection
                pass
            self._nc = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # -- the stream --------------------------------------------------------------------------
    def ensure_stream(self, *, adjust: bool = True) -> BusState:
        """Create the stream or check it; `adjust`: bring its retention to `[bus]`'s (capture
        does; a reader only checks, so two configurations never undo each other)."""
        return self._run(self._ensure_stream(adjust), REQUEST_TIMEOUT * 3)

    async def _ensure_stream(self, adjust: bool) -> BusState:
        from nats.js import api, errors

        bus = self.settings
        wanted = self.subject.rsplit(".", 1)[0] + ".>"
        try:
            info = await self._js.stream_info(self.stream)
        except errors.NotFoundError:
            config = api.StreamConfig(
                name=self.stream, subjects=[wanted], storage=api.StorageType.FILE,
                num_replicas=bus.replicas, max_bytes=bus.max_bytes,
                max_age=bus.max_age_seconds or None,
                # JetStream wants the de-duplication window within the retention age
                duplicate_window=min(DUPLICATE_WINDOW, bus.max_age_seconds or DUPLICATE_WINDOW),
                discard=api.DiscardPolicy.OLD,
                description=f"cdc-sync: transactions of source {self.source}")
            try:
                info = await self._js.add_stream(config)
            except Exception as exc:
                raise BusError(f"bus: cannot create stream {self.stream}: "
                               f"{_one_line(exc)}") from None
        except Exception as exc:
            raise BusError(f"bus: cannot read stream {self.stream}: {_one_line(exc)}") from None
        subjects = list(info.config.subjects or [])
        if wanted not in subjects and self.subject not in subjects:
            raise BusStreamError(
                f"bus: stream {self.stream} exists with subjects {subjects}, not {wanted}: "
                f'set [bus] stream to another name, or delete that stream')
        return _state(self.stream, await self._check_stream(info, adjust))

    async def _check_stream(self, info: Any, adjust: bool) -> Any:
        """An existing stream of ours: refuse settings that lose messages the sites need,
        bring its retention to what `[bus]` says (a line in the log when it changes)."""
        from nats.js import api

        config = info.config
        fix = "set [bus] stream to another name, or delete that stream"
        if config.storage not in (None, api.StorageType.FILE):
            raise BusStreamError(f"bus: stream {self.stream} keeps its messages in "
                                 f"{_name(config.storage)} storage, cdc-sync needs file "
                                 f"storage (a restarted server must keep them): {fix}")
        if config.retention not in (None, api.RetentionPolicy.LIMITS):
            raise BusStreamError(f"bus: stream {self.stream} has {_name(config.retention)} "
                                 f"retention, which drops messages one site has read before "
                                 f"the others: cdc-sync needs limits retention: {fix}")
        bus = self.settings
        wanted = {"max_bytes": bus.max_bytes, "max_age": float(bus.max_age_seconds or 0),
                  "num_replicas": bus.replicas, "discard": api.DiscardPolicy.OLD}
        have = {"max_bytes": config.max_bytes if config.max_bytes is not None else -1,
                "max_age": float(config.max_age or 0),
                "num_replicas": config.num_replicas or 1,
                "discard": config.discard or api.DiscardPolicy.OLD}
        changed = {k: v for k, v in wanted.items() if have[k] != v}
        if not changed or not adjust:
            return info
        window = min(DUPLICATE_WINDOW, bus.max_age_seconds or DUPLICATE_WINDOW)
        try:
            info = await self._js.update_stream(config.evolve(
                **changed, duplicate_window=min(window, config.duplicate_window or window)))
        except Exception as exc:
            raise BusError(f"bus: cannot change stream {self.stream} to "
                           f"{_settings_text(changed)}: {_one_line(exc)}") from None
        log.info("bus: stream %s now has %s (was %s)", self.stream, _settings_text(changed),
                 _settings_text({k: have[k] for k in changed}))
        return info

    def state(self) -> BusState:
        async def get() -> BusState:
            return _state(self.stream, await self._js.stream_info(self.stream))
        try:
            return self._run(get(), REQUEST_TIMEOUT + 5)
        except BusError:
            raise
        except Exception as exc:
            raise BusError(f"bus: cannot read stream {self.stream}: {_one_line(exc)}") from None

    def headers_at(self, seq: int) -> dict[str, str] | None:
        """The headers of the message at `seq`; None if there is none (deleted or beyond)."""
        async def get() -> dict[str, str] | None:
            from nats.js import errors
            try:
                msg = await self._js.get_msg(self.stream, seq)
            except errors.NotFoundError:
                return None
            return dict(msg.headers or {})
        return self._run(get(), REQUEST_TIMEOUT + 5)

    def tail(self) -> tuple[int, dict[str, str] | None]:
        """(the stream's last sequence, the headers of its last cdc-sync message or None)."""
        state = self.state()
        for seq in range(state.last_seq, max(state.first_seq, state.last_seq - TAIL_LOOKBACK,
                                             1) - 1, -1):
            headers = self.headers_at(seq)
            if headers and HEADER_TX in headers:
                return state.last_seq, headers
        return state.last_seq, None

    # -- publishing ------------------------------------------------------------------------
    def publish(self, chunks: Sequence[Chunk],
                after: int | str) -> list[concurrent.futures.Future[int]]:
        """Send `chunks` in order, the first expecting the stream to end at `after` (a
        sequence, or a message id); one future per chunk, resolving to its stream sequence."""
        return self._run(self._publish(chunks, after), REQUEST_TIMEOUT * 6)

    async def _publish(self, chunks: Sequence[Chunk],
                       after: int | str) -> list[concurrent.futures.Future[int]]:
        out: list[concurrent.futures.Future[int]] = []
        # While the client reconnects, nats-py would buffer publishes until its outbound
        # buffer overflows: a transient bus outage, one line, and capture reads them again.
        if self._nc is None or not self._nc.is_connected:
            raise BusError(f"bus: not connected to {self.where}")
        if self._ack_prefix is None:
            # nats-py's publish_async never completes a refused publish (its reply handler
            # raises instead of setting the future), so acknowledgements are read here.
            self._ack_prefix = self._nc.new_inbox()
            await self._nc.subscribe(self._ack_prefix + ".*", cb=self._on_ack)
        for chunk in chunks:
            while len(self._acks) >= MAX_PENDING_PUBLISHES:
                self._acks_drained.clear()
                try:
                    await asyncio.wait_for(self._acks_drained.wait(), REQUEST_TIMEOUT)
                except TimeoutError:
                    raise BusError(f"bus: {self.where} acknowledges nothing: "
                                   f"{len(self._acks)} messages unacknowledged") from None
            headers = chunk.headers()
            if isinstance(after, int):
                headers[EXPECTED_LAST_SEQ] = str(after)
            else:
                headers[EXPECTED_LAST_ID] = after
            after = chunk.msg_id
            self._ack_serial += 1
            token = str(self._ack_serial)
            done: concurrent.futures.Future[int] = concurrent.futures.Future()
            self._acks[token] = done
            try:
                await self._nc.publish(self.subject, chunk.body(),
                                       reply=f"{self._ack_prefix}.{token}", headers=headers)
            except Exception as exc:  # nats-py's kinds: buffer full, disconnected
                self._acks.pop(token, None)
                raise BusError(f"bus: publishing to {self.where} failed: "
                               f"{_one_line(exc)}") from None
            out.append(done)
        return out

    async def _on_ack(self, msg: Any) -> None:
        done = self._acks.pop(msg.subject.rsplit(".", 1)[-1], None)
        if len(self._acks) < MAX_PENDING_PUBLISHES:
            self._acks_drained.set()
        if done is None or done.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            done.set_exception(BusError(f"bus: no stream {self.stream} takes the messages "
                                        f"on {self.subject} (no responders)"))
            return
        try:
            reply = json.loads(msg.data)
            if "error" in reply:
                why = reply["error"].get("description") or reply["error"]
                done.set_exception(BusError(f"bus: JetStream refused a message: {why}"))
            else:
                done.set_result(int(reply["seq"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            done.set_exception(BusError("bus: an acknowledgement that is not JetStream's"))

    def abandon_acks(self) -> None:
        """Forget the acknowledgements still awaited (a new capture session starts)."""
        def clear() -> None:
            for done in self._acks.values():
                if not done.done():
                    done.set_exception(BusError("bus: acknowledgement abandoned"))
            self._acks.clear()
            self._acks_drained.set()
        self._loop.call_soon_threadsafe(clear)

    # -- consuming -------------------------------------------------------------------------
    def consumer(self, start_seq: int) -> Consumer:
        return Consumer(self, self._run(self._consumer(start_seq), REQUEST_TIMEOUT + 5))

    async def _consumer(self, start_seq: int) -> Any:
        from nats.js import api

        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq),
            ack_policy=api.AckPolicy.ALL, max_ack_pending=-1, inactive_threshold=300.0)
        return await self._js.pull_subscribe(self.subject, durable=None, stream=self.stream,
                                             config=config)


class Consumer:
    """An ephemeral pull consumer of the stream (`BusClient.consumer`).

    Its messages come in delivery order without a hole, or `fetch` raises `BusError`: a
    message that reached the client after its fetch had timed out can be lost, and a later
    acknowledgement (AckAll) would make JetStream forget it, so a jump in the consumer's
    delivery sequence ends the reading (the caller starts again from its own position)."""

    def __init__(self, client: BusClient, sub: Any) -> None:
        self._client = client
        self._sub = sub
        self._delivered = 0  # the consumer sequence of the last message taken

    def fetch(self, n: int, timeout: float) -> list[BusMessage]:
        return self._client._run(self._fetch(n, timeout), timeout + REQUEST_TIMEOUT)

    async def _fetch(self, n: int, timeout: float) -> list[BusMessage]:
        from nats import errors
        try:
            msgs = await self._sub.fetch(n, timeout=timeout)
        except (errors.TimeoutError, TimeoutError):
            return []
        except Exception as exc:
            raise BusError(f"bus: cannot read stream {self._client.stream}: "
                           f"{_one_line(exc)}") from None
        out: list[BusMessage] = []
        for m in msgs:
            seq = m.metadata.sequence
            if seq.consumer != self._delivered + 1:
                raise BusError(f"bus: stream {self._client.stream}: delivery {seq.consumer} "
                               f"came after {self._delivered} (messages lost on the way); "
                               f"reading again")
            self._delivered = seq.consumer
            out.append(BusMessage(seq.stream, dict(m.headers or {}), m.data))
        if msgs:
            await msgs[-1].ack()  # AckAll: what we took (the site's progress is the truth)
        return out

    def close(self) -> None:
        try:
            self._client._run(self._sub.unsubscribe(), REQUEST_TIMEOUT)
        except Exception:  # the consumer goes away by itself when inactive
            pass


async def _first_connect(nats: Any, options: dict[str, Any]) -> Any:
    # nats-py keeps trying forever with max_reconnect_attempts = -1 only after a first
    # connection; the first one is retried here until the caller's timeout.
    while True:
        try:
            return await nats.connect(**options)
        except Exception as exc:
            if _is_auth_error(exc):
                raise
            await asyncio.sleep(0.5)


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _settings_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_name(v)}" for k, v in values.items())


def _state(stream: str, info: Any) -> BusState:
    s = info.state
    return BusState(stream, int(s.messages), int(s.bytes), int(s.first_seq), int(s.last_seq))


def _one_line(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split()) if exc is not None else ""
    return text or type(exc).__name__

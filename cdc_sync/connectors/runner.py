"""`ConnectorRunner`: delivers the outbound connector table (`cdc_sync.outbox`) to one connector.

Contract:

- One runner per `[[connectors]]` entry, on its own thread and its own connection to the outbox
  site (`settings.outbox_site`). It never touches the applier: a dead or slow endpoint only
  grows that connector's backlog, it never slows replication.
- At-least-once, in order. Each step reads the next rows of this source
  (`WHERE source = <source.name> AND seq > delivered_seq ORDER BY seq LIMIT batch_size`),
  keeps those whose `topic` matches the connector's `tables` patterns, delivers them as one
  batch, and only then advances `connector_state.delivered_seq` to the last row read (over
  filtered-out rows too). A crash between delivery and that update redelivers the same batch
  with the same event ids; nothing is ever skipped: a failed batch is retried, unchanged,
  until it is acknowledged.
- Why `seq > delivered_seq` is safe: `seq` is a bigserial, assigned at INSERT time, not at
  commit, so with two concurrent writers a smaller seq could become visible after a larger one
  had been read, and be skipped. The outbox of a source has exactly one writer, the applier of
  the outbox site, which commits its transactions one after another in source commit order; so
  the rows of a source become visible in seq order and `seq` order is commit order.
- Only one runner delivers a given connector at a time: it holds a session advisory lock
  (`advisory_key(name)`) on its connection; a second runner waits, retrying.
- Failures (endpoint, outbox database) are retried with exponential backoff and full jitter
  (a delay drawn uniformly from [0, min(60 s, 0.5 s * 2**n)]). A delivery failure is recorded
  in `connector_state.last_error` / `last_error_at` (one line, no secrets); they are kept
  after recovery, compare them with `last_delivery_at`.
- Pruning (at most every 60 s, by `prune_outbox`): rows of this source with
  `seq <= min(delivered_seq)` over all configured connectors (a connector without a state row
  counts as 0) and `created_at` older than `outbox.retention_seconds` are deleted, in batches.
- `backlog(conn, name, source=..., tables=...)` counts the rows a connector has still to pass;
  `connector_status(settings)` reports every configured connector for `cdc-sync status`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..backoff import backoff_delay
from ..config import ConnectorSettings, Settings, table_matches
from ..errors import CdcSyncError, SiteError, dsn_label, mask_dsn
from .webhook import WebhookClient

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "PRUNE_INTERVAL",
    "ConnectorBusy",
    "ConnectorRunner",
    "DeliveryClient",
    "advisory_key",
    "backlog",
    "connector_status",
    "make_client",
    "prune_outbox",
    "start_runners",
]

log = logging.getLogger(__name__)

BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 60.0
PRUNE_INTERVAL: Final = 60.0
POLL_INTERVAL: Final = 0.5
PRUNE_BATCH: Final = 10_000
CONNECT_TIMEOUT: Final = 10
MAX_ERROR_CHARS: Final = 1000


class DeliveryClient(Protocol):
    """What a runner delivers through: raise on anything but an acknowledgement."""

    def deliver(self, events: list[dict[str, Any]]) -> None: ...


class ConnectorBusy(CdcSyncError):
    """Another runner holds this connector's lock."""


def make_client(connector: ConnectorSettings) -> WebhookClient:
    """The client for a connector's `kind` (only "webhook" exists)."""
    if connector.kind == "webhook":
        return WebhookClient(connector)
    raise CdcSyncError(f"connector {connector.name}: unknown kind {connector.kind}")  # pragma: no cover


def advisory_key(connector_name: str) -> int:
    """The signed 64-bit advisory-lock key guarding one connector's delivery."""
    digest = hashlib.blake2b(f"cdc_sync.connector:{connector_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, CdcSyncError) else f"{type(exc).__name__}: {exc}"
    return mask_dsn(" ".join(text.split()))[:MAX_ERROR_CHARS]


def _connect(dsn: str, application_name: str) -> psycopg.Connection[Any]:
    extra: dict[str, Any] = {}
    try:
        if "connect_timeout" not in conninfo_to_dict(dsn):
            extra["connect_timeout"] = CONNECT_TIMEOUT
    except psycopg.Error:
        pass
    return psycopg.connect(dsn, autocommit=True, application_name=application_name, **extra)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def prune_outbox(conn: psycopg.Connection[Any], settings: Settings) -> int:
    """Delete this source's outbox rows every configured connector has passed and that are
    older than `outbox.retention_seconds`; returns how many. `conn` must be in autocommit."""
    names = [c.name for c in settings.connectors]
    if not names:
        return 0
    row = conn.execute(
        "SELECT min(coalesce(s.delivered_seq, 0)) FROM unnest(%s::text[]) AS c(name) "
        "LEFT JOIN cdc_sync.connector_state s ON s.connector = c.name",
        (names,),
    ).fetchone()
    floor = int(row[0]) if row is not None and row[0] is not None else 0
    if floor <= 0:
        return 0
    total = 0
    while True:
        cur = conn.execute(
            "DELETE FROM cdc_sync.outbox WHERE id IN ("
            " SELECT id FROM cdc_sync.outbox WHERE source = %s AND seq <= %s"
            " AND created_at < now() - make_interval(secs => %s) ORDER BY seq LIMIT %s)",
            (settings.source.name, floor, settings.outbox.retention_seconds, PRUNE_BATCH),
        )
        total += cur.rowcount
        if cur.rowcount < PRUNE_BATCH:
            return total


def backlog(conn: psycopg.Connection[Any], connector_name: str, *, source: str | None = None,
            tables: Sequence[str] | None = None) -> int:
    """Outbox rows after the connector's `delivered_seq` (of `source` if given; only those
    whose topic matches `tables` if given)."""
    query = ("SELECT topic, count(*) FROM cdc_sync.outbox WHERE seq > coalesce("
             "(SELECT delivered_seq FROM cdc_sync.connector_state WHERE connector = %s), 0)")
    params: list[Any] = [connector_name]
    if source is not None:
        query += " AND source = %s"
        params.append(source)
    query += " GROUP BY topic"
    total = 0
    for topic, count in conn.execute(query, params).fetchall():
        if tables is None or table_matches(tables, topic):
            total += int(count)
    return total


def connector_status(settings: Settings) -> list[dict[str, Any]]:
    """One dict per configured connector: name, backlog, delivered_seq, last_error,
    last_error_at, last_delivery_at (timestamps as ISO 8601 strings or None).

    Raises `SiteError` (one line, no password) if the outbox site cannot be read."""
    if not settings.connectors:
        return []
    site = settings.outbox_site
    where = f"outbox site {site.name} ({dsn_label(site.dsn)})"
    try:
        with _connect(site.dsn, "cdc_sync:status") as conn:
            out = []
            for c in settings.connectors:
                row = conn.execute(
                    "SELECT delivered_seq, last_error, last_error_at, last_delivery_at "
                    "FROM cdc_sync.connector_state WHERE connector = %s", (c.name,)).fetchone()
                delivered, error, error_at, delivery_at = row or (0, None, None, None)
                out.append({
                    "name": c.name,
                    "backlog": backlog(conn, c.name, source=settings.source.name,
                                       tables=c.tables),
                    "delivered_seq": int(delivered),
                    "last_error": error,
                    "last_error_at": _iso(error_at),
                    "last_delivery_at": _iso(delivery_at),
                })
            return out
    except psycopg.errors.UndefinedTable as exc:
        raise SiteError(f"{where}: the cdc_sync schema is missing (run cdc-sync init)") from exc
    except psycopg.Error as exc:
        raise SiteError(f"{where}: {_one_line(exc)}") from exc


class ConnectorRunner:
    """Delivers one connector (see the module docstring). `run(stop)` until `stop` is set;
    `step()` does one batch (tests)."""

    def __init__(self, settings: Settings, connector: ConnectorSettings, *,
                 client: DeliveryClient | None = None,
                 poll_interval: float = POLL_INTERVAL,
                 backoff_base: float = BACKOFF_BASE, backoff_cap: float = BACKOFF_CAP,
                 prune_interval: float = PRUNE_INTERVAL) -> None:
        self.settings = settings
        self.connector = connector
        self.name = connector.name
        self.source = settings.source.name
        self._owns_client = client is None
        self.client: DeliveryClient = client if client is not None else make_client(connector)
        self.poll_interval = poll_interval
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.prune_interval = prune_interval
        self._dsn = settings.outbox_site.dsn
        self._where = f"outbox site {settings.outbox_site.name} ({dsn_label(self._dsn)})"
        self._conn: psycopg.Connection[Any] | None = None
        self._matched: dict[str, bool] = {}
        self._last_prune = -math.inf
        self.failures = 0            # consecutive failed steps
        self.last_error: str | None = None
        self.delivered_events = 0    # events acknowledged by this runner
        self.delivered_seq = 0       # as of the last step

    # -- one batch ----------------------------------------------------------------------------
    def step(self) -> int:
        """Deliver the next batch; return how many outbox rows were passed (delivered or
        filtered out), 0 when caught up. Raises `DeliveryError` (recorded in connector_state)
        or a database error; nothing is advanced then."""
        conn = self._connection()
        try:
            row = conn.execute(
                "SELECT delivered_seq FROM cdc_sync.connector_state WHERE connector = %s",
                (self.name,)).fetchone()
            delivered_seq = int(row[0]) if row is not None else 0
            self.delivered_seq = delivered_seq
            rows = conn.execute(
                "SELECT seq, topic, event FROM cdc_sync.outbox WHERE source = %s AND seq > %s "
                "ORDER BY seq LIMIT %s",
                (self.source, delivered_seq, self.connector.batch_size)).fetchall()
        except psycopg.Error:
            self._drop_connection()
            raise
        if not rows:
            return 0
        last_seq = int(rows[-1][0])
        events = [event for _seq, topic, event in rows if self._wants(topic)]
        if events:
            try:
                self.client.deliver(events)
            except Exception as exc:
                self._record_error(conn, exc)
                raise
        try:
            conn.execute(
                "UPDATE cdc_sync.connector_state SET delivered_seq = %s, last_delivery_at = "
                "CASE WHEN %s THEN now() ELSE last_delivery_at END "
                "WHERE connector = %s AND delivered_seq < %s",
                (last_seq, bool(events), self.name, last_seq))
        except psycopg.Error:
            # Delivered but not recorded: the batch will be delivered again (same ids).
            self._drop_connection()
            raise
        self.delivered_seq = last_seq
        self.delivered_events += len(events)
        return len(rows)

    def prune(self) -> int:
        """Prune the outbox now (see `prune_outbox`)."""
        conn = self._connection()
        try:
            deleted = prune_outbox(conn, self.settings)
        except psycopg.Error:
            self._drop_connection()
            raise
        self._last_prune = time.monotonic()
        if deleted:
            log.info("connector %s: pruned %d delivered outbox rows", self.name, deleted)
        return deleted

    # -- the loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set; never raises for delivery or database failures."""
        try:
            while not stop.is_set():
                try:
                    passed = self.step()
                except Exception as exc:
                    self.failures += 1
                    self.last_error = _one_line(exc)
                    delay = self.backoff_delay(self.failures)
                    if isinstance(exc, (CdcSyncError, psycopg.Error)):
                        log.warning("connector %s: %s; retrying in %.1f s", self.name,
                                    self.last_error, delay)
                    else:
                        log.exception("connector %s failed; retrying in %.1f s", self.name,
                                      delay)
                    stop.wait(delay)
                    continue
                self.failures = 0
                if time.monotonic() - self._last_prune >= self.prune_interval:
                    try:
                        self.prune()
                    except Exception as exc:
                        self._last_prune = time.monotonic()
                        log.warning("connector %s: pruning the outbox failed: %s", self.name,
                                    _one_line(exc))
                if passed < self.connector.batch_size:
                    stop.wait(self.poll_interval)
        finally:
            self.close()

    def backoff_delay(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(failures-1))] (`cdc_sync.backoff`)."""
        return backoff_delay(failures, self.backoff_base, self.backoff_cap, jitter="full")

    def close(self) -> None:
        self._drop_connection()
        if self._owns_client:
            close = getattr(self.client, "close", None)
            if callable(close):
                close()

    # -- helpers ------------------------------------------------------------------------------
    def _wants(self, topic: str) -> bool:
        hit = self._matched.get(topic)
        if hit is None:
            hit = self._matched[topic] = table_matches(self.connector.tables, topic)
        return hit

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = _connect(self._dsn, f"cdc_sync:connector:{self.name}")
        except psycopg.Error as exc:
            raise CdcSyncError(f"connector {self.name}: {self._where}: {_one_line(exc)}") from exc
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)",
                               (advisory_key(self.name),)).fetchone()
            if not got or not got[0]:
                conn.close()
                raise ConnectorBusy(f"connector {self.name}: another runner is delivering it")
            conn.execute(
                "INSERT INTO cdc_sync.connector_state (connector) VALUES (%s) "
                "ON CONFLICT (connector) DO NOTHING", (self.name,))
        except psycopg.errors.UndefinedTable as exc:
            conn.close()
            raise CdcSyncError(f"connector {self.name}: {self._where}: the cdc_sync schema is "
                               "missing (run cdc-sync init)") from exc
        except psycopg.Error as exc:
            conn.close()
            raise CdcSyncError(f"connector {self.name}: {self._where}: {_one_line(exc)}") from exc
        self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # also releases the advisory lock
            except Exception:  # pragma: no cover - closing a broken connection
                pass

    def _record_error(self, conn: psycopg.Connection[Any], exc: BaseException) -> None:
        message = _one_line(exc)
        self.last_error = message
        try:
            conn.execute(
                "UPDATE cdc_sync.connector_state SET last_error = %s, last_error_at = now() "
                "WHERE connector = %s", (message, self.name))
        except psycopg.Error as db_exc:
            log.warning("connector %s: could not record the error: %s", self.name,
                        _one_line(db_exc))
            self._drop_connection()


def start_runners(settings: Settings, stop: threading.Event, *,
                  clients: dict[str, DeliveryClient] | None = None) -> list[threading.Thread]:
    """Start one daemon thread per configured connector, each running `ConnectorRunner.run`
    until `stop` is set. Join them after setting `stop` (a thread ends within the connector's
    `timeout_seconds` plus one database round trip)."""
    threads = []
    for connector in settings.connectors:
        client = (clients or {}).get(connector.name)
        runner = ConnectorRunner(settings, connector, client=client)
        thread = threading.Thread(target=runner.run, args=(stop,),
                                  name=f"connector-{connector.name}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads


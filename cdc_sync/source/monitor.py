"""`SourceMonitor`: a plain (non-replication) source connection for heartbeats and slot checks.

Heartbeats: a non-transactional `pg_logical_emit_message(false, 'cdc_sync.heartbeat', '')`
writes a record in the published database, so the slot has something of ours to decode and
confirm even when only other databases write: the slot advances and WAL does not pile up.
Sinks ignore these messages (no event); sites record the position as applied.

Every failure is logged and retried later; the monitor never stops the stream.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from ..sessions import SESSION_OPTIONS

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "cdc_sync.heartbeat"


class SourceMonitor:
    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, options=SESSION_OPTIONS,
                                         connect_timeout=10, application_name="cdc_sync:monitor")
        return self._conn

    def heartbeat(self) -> bool:
        try:
            self._connection().execute(
                "SELECT pg_logical_emit_message(false, %s, '')", (HEARTBEAT_PREFIX,))
            return True
        except psycopg.Error as exc:
            log.debug("heartbeat failed: %s", exc)
            self.close()
            return False

    def retained_bytes(self) -> int | None:
        try:
            row = self._connection().execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
                "FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()
        except psycopg.Error as exc:
            log.debug("slot check failed: %s", exc)
            self.close()
            return None
        return int(row[0]) if row and row[0] is not None else None

    def confirmed_flush(self) -> int | None:
        """The slot's confirmed_flush_lsn as an int, or None when it cannot be read."""
        try:
            row = self._connection().execute(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots "
                "WHERE slot_name = %s", (self.slot,)).fetchone()
        except psycopg.Error as exc:
            log.debug("slot check failed: %s", exc)
            self.close()
            return None
        return int(row[0]) if row and row[0] is not None else None

    def has_replication_origins(self) -> bool:
        """Whether the source has any replication origin (writes there may carry one). True
        when it cannot be read: the caller then takes the cautious path."""
        try:
            row = self._connection().execute(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_origin)").fetchone()
        except psycopg.Error as exc:
            log.debug("origin check failed: %s", exc)
            self.close()
            return True
        return bool(row and row[0])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

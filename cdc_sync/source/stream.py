"""`ReplicationStream`: pgoutput over the streaming-replication protocol on psycopg 3's `pq`.

psycopg has no replication API; a `replication="database"` connection runs START_REPLICATION
and the COPY_BOTH stream is read with `pgconn.get_copy_data(1)` (non-blocking) and written with
`put_copy_data` / `flush`, waiting on the socket in between. This module only moves frames:
`read_raw` returns the CopyData payloads (`decode_frame` turns one into an `XLogData` /
`PrimaryKeepalive`), `send_status` reports positions. It never acknowledges anything on its
own: the caller decides what is flushed.

Connection problems raise `StreamLost` (retry), a slot used by another process `SlotBusy`,
anything the server refuses for good `SourceError`.
"""

from __future__ import annotations

import logging
import select
import time
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from psycopg import pq

from ..errors import SourceError, mask_dsn
from ..protocol import (
    INVALID_LSN,
    Lsn,
    PrimaryKeepalive,
    ProtocolError,
    XLogData,
    datetime_to_pg_timestamp,
    decode_copy_data,
    encode_standby_status,
)
from ..sessions import SESSION_OPTIONS

log = logging.getLogger(__name__)

MAX_FRAMES_PER_READ: Final = 2000
# A read that finds the socket dry after fewer than COALESCE_BELOW frames naps COALESCE_NAP
# seconds once and reads on. A reader that keeps up wakes (and is woken by the WAL sender's
# every send) for one or two messages at a time; the nap lets messages pile up in the socket
# instead. Measured on loopback TCP, a 100k-change backlog: 0.77 s plain, 0.29 s with the nap
# (pg_recvlogical: 0.84 s). It adds at most the nap to a message's latency. Only capture asks
# for it (`coalesce`): the in-process pipeline, reading faster than a filtering site takes its
# batches, would fill that site's bounded queue and hold more memory (tests/faults).
COALESCE_BELOW: Final = 64
COALESCE_NAP: Final = 0.0002
CONNECT_TIMEOUT: Final = 10


class StreamLost(SourceError):
    """The replication connection failed or was closed; reconnecting may help."""


class SlotBusy(SourceError):
    """The replication slot is in use by another process."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def replication_connect(dsn: str, *, decoding_work_mem: str | None = None
                        ) -> psycopg.Connection[Any]:
    """A `replication=database` connection with our session settings; errors are one line."""
    options = SESSION_OPTIONS
    if decoding_work_mem:
        options += f" -c logical_decoding_work_mem={decoding_work_mem}"
    try:
        return psycopg.connect(
            dsn, replication="database", autocommit=True, options=options,
            connect_timeout=CONNECT_TIMEOUT, application_name="cdc_sync",
        )
    except psycopg.OperationalError as exc:
        raise StreamLost(f"source: {describe_connect_error(dsn, exc)}") from exc


def describe_connect_error(dsn: str, exc: BaseException) -> str:
    """One line naming host:port/db and the server's reason, without a password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        info = {}
    where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
    reason = " ".join(str(exc).split())
    return mask_dsn(f"{where}: {reason}")


class ReplicationStream:
    """One START_REPLICATION session (see the module docstring)."""

    def __init__(self, dsn: str, slot: str, publication: str, *, origin_none: bool = False,
                 streaming: bool = False, decoding_work_mem: str | None = None,
                 coalesce: bool = False) -> None:
        self.dsn = dsn
        self.coalesce = coalesce  # nap once on a short read (COALESCE_*): bus capture only
        self.slot = slot
        self.publication = publication
        self.origin_none = origin_none
        self.streaming = streaming
        self.decoding_work_mem = decoding_work_mem
        self._conn: psycopg.Connection[Any] | None = None
        self.server_version = 0

    def open(self, start: Lsn = INVALID_LSN) -> None:
        """START_REPLICATION. With `streaming` asked and a server of 14 or later, protocol 2
        with `streaming 'on'` (in-progress transactions are streamed); `streaming` then tells
        whether this session streams."""
        conn = replication_connect(self.dsn, decoding_work_mem=(
            self.decoding_work_mem if self.streaming else None))
        self._conn = conn
        self.server_version = conn.info.server_version
        self.streaming = self.streaming and self.server_version >= 140000
        options = [
            "proto_version '2'" if self.streaming else "proto_version '1'",
            f"publication_names {quote_literal(quote_ident(self.publication))}",
            "messages 'true'",
        ]
        if self.streaming:
            options.append("streaming 'on'")
        if self.origin_none and self.server_version >= 160000:
            options.append("origin 'none'")
        cmd = (f"START_REPLICATION SLOT {quote_ident(self.slot)} LOGICAL {start} "
               f"({', '.join(options)})")
        pg = conn.pgconn
        pg.send_query(cmd.encode())
        deadline = time.monotonic() + CONNECT_TIMEOUT * 3
        while True:
            pg.consume_input()
            if not pg.is_busy():
                break
            if time.monotonic() > deadline:
                self.close()
                raise StreamLost("source: START_REPLICATION did not answer")
            select.select([pg.socket], [], [], 1.0)
        res = pg.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            msg = (res.error_message if res is not None else pg.error_message).decode(
                "utf-8", "replace")
            self.close()
            msg = " ".join(msg.split())
            if "is active for PID" in msg:
                raise SlotBusy(f"source: replication slot {self.slot!r} is already in use by "
                               f"another process ({msg})")
            if "does not exist" in msg:
                raise SourceError(f"source: {msg} (run `cdc-sync init`)")
            raise StreamLost(f"source: START_REPLICATION failed: {msg}")
        pg.nonblocking = 1
        log.info("streaming from slot %s at %s", self.slot, start)

    @staticmethod
    def decode_frame(data: bytes) -> XLogData | PrimaryKeepalive:
        """One payload of `read_raw` decoded; a malformed one raises `StreamLost`."""
        try:
            return decode_copy_data(data)
        except ProtocolError as exc:
            raise StreamLost(f"source: malformed replication data: {exc}") from exc

    def read_raw(self, timeout: float) -> list[bytes]:
        """The CopyData payloads available now (XLogData or keepalive: `decode_copy_data`, or
        sliced directly on the hot path), waiting up to `timeout` seconds for the first one."""
        pg = self._pgconn()
        frames: list[bytes] = []
        waited = napped = False
        try:
            while len(frames) < MAX_FRAMES_PER_READ:
                n, data = pg.get_copy_data(1)
                if n > 0:
                    frames.append(bytes(data))
                    continue
                if n == 0:
                    if (self.coalesce and frames and not napped
                            and len(frames) < COALESCE_BELOW):
                        napped = True
                        time.sleep(COALESCE_NAP)
                        pg.consume_input()
                        continue
                    if frames or waited:
                        break
                    ready, _, _ = select.select([pg.socket], [], [], timeout)
                    waited = True
                    if not ready:
                        break
                    pg.consume_input()
                    continue
                res = pg.get_result()
                msg = res.error_message.decode("utf-8", "replace") if res else ""
                raise StreamLost(f"source: replication stream ended {' '.join(msg.split())}")
        except psycopg.OperationalError as exc:
            raise StreamLost(f"source: replication connection lost: {exc}") from exc
        return frames

    def send_status(self, write: Lsn, flush: Lsn, apply: Lsn, *, reply: bool = False) -> None:
        pg = self._pgconn()
        now = datetime_to_pg_timestamp(datetime.now(UTC))
        try:
            pg.put_copy_data(encode_standby_status(write, flush, apply, now, reply))
            while pg.flush() == 1:
                select.select([], [pg.socket], [], 1.0)
        except psycopg.OperationalError as exc:
            raise StreamLost(f"source: replication connection lost: {exc}") from exc

    def finish(self, flush: Lsn, timeout: float = 10.0) -> bool:
        """Send a last status (`flush`), end the COPY and read the stream out, so the server
        has processed the status before we disconnect. True when that completed."""
        if self._conn is None:
            return False
        pg = self._conn.pgconn
        try:
            self.send_status(flush, flush, flush)
            pg.put_copy_end()
            while pg.flush() == 1:
                select.select([], [pg.socket], [], 1.0)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                n, _data = pg.get_copy_data(1)
                if n == -1:
                    while pg.get_result() is not None:
                        pass
                    return True
                if n == 0:
                    select.select([pg.socket], [], [], 0.5)
                    pg.consume_input()
            return False
        except (psycopg.Error, StreamLost) as exc:
            log.debug("ending the replication stream: %s", exc)
            return False

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _pgconn(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise StreamLost("source: replication stream is not open")
        return self._conn.pgconn

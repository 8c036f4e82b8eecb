"""`AheadPipe`: statements sent on a site connection ahead of their results (libpq pipeline mode).

The fast path sends chunk N+1 before it reads chunk N's results, so the site server goes from
one chunk to the next without waiting for us (our thread may be building the next chunk, or
waiting for the GIL while the decoder holds it). psycopg's own pipeline waits for every result
at each sync, so this talks to its `pq` layer directly, as the replication stream does. The
writer also sends small chunks and every commit through it and collects at once
(`SiteWriter._send_now`): one write and one read per batch, where psycopg's pipeline flushes
and polls per statement.

Contract:
- `send(batch)` sends the statements of one batch (query text with `$n` placeholders, text
  parameters as bytes or None for NULL) followed by a Sync, and flushes them; it never waits
  for results. The connection enters pipeline mode at the first `send`.
- `collect()` reads the results of the oldest batch not collected yet, and only those: one
  `Outcome` per statement, in order (rows affected; or the error, as the psycopg exception the
  server's error maps to; statements after an error in the same or a later batch, up to the
  next Sync the server skipped, are `aborted`).
- Statements with parameters are prepared on the connection the first time their text is sent
  (named `cdc_ahead_N`), then executed by name: the site parses and plans a statement once, as
  with psycopg's own prepared statements, not once per batch. A failed or skipped preparation
  is forgotten (made again next time); a failed one's error is the statement's outcome.
- `close()`, with nothing outstanding, leaves the pipeline mode `send` entered (never psycopg's
  own): the connection can be used through psycopg again. `discard()` reads and drops every
  outstanding result, then closes.
- While batches are outstanding, nothing else may use the connection. A lost connection raises
  `psycopg.OperationalError`; the connection is unusable then.
"""

from __future__ import annotations

import re
import select
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg import pq

Statement = tuple[bytes, Sequence[bytes | None] | None]

_WAIT_SECONDS = 5.0  # one select() at a time; a dead server shows as a socket error


@dataclass(frozen=True, slots=True)
class Outcome:
    """One statement's result: rows affected (-1 when the server gave no count), its error, or
    `aborted` (skipped by the server after an earlier error)."""

    rows: int = -1
    error: psycopg.Error | None = None
    aborted: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.aborted


_PLACEHOLDER = re.compile(r"%(%|s)")


def dollar_params(query: str) -> bytes:
    """A psycopg-style query (`%s` placeholders, `%%` for a literal `%`) as libpq wants it
    (`$1`, `$2`…), encoded."""
    n = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal n
        if m.group(1) == "%":
            return "%"
        n += 1
        return f"${n}"

    return _PLACEHOLDER.sub(sub, query).encode()


class AheadPipe:
    """Batches in flight on one psycopg connection (see the module docstring)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        # per outstanding batch, per statement: the name it was prepared under in this batch
        self._batches: deque[list[bytes | None]] = deque()
        self._names: dict[bytes, bytes] = {}  # statement text -> prepared statement name
        self._prepared = 0  # names given so far (a forgotten one is not given again)
        self._entered = False  # we put the connection in pipeline mode (not psycopg)

    @property
    def outstanding(self) -> int:
        """Batches sent whose results were not collected yet."""
        return len(self._batches)

    def send(self, statements: Sequence[Statement]) -> None:
        pg = self._conn.pgconn
        if not self._entered:
            pg.enter_pipeline_mode()
            self._entered = True
        prepared: list[bytes | None] = []
        for query, params in statements:
            if params is None:
                pg.send_query_params(query, None)
                prepared.append(None)
                continue
            name = self._names.get(query)
            if name is None:
                name = self._names[query] = b"cdc_ahead_%d" % self._prepared
                self._prepared += 1
                pg.send_prepare(name, query)
                prepared.append(name)
            else:
                prepared.append(None)
            pg.send_query_prepared(name, params)
        pg.pipeline_sync()
        self._batches.append(prepared)
        self._flush(pg)

    def collect(self) -> list[Outcome]:
        prepared = self._batches.popleft()
        pg = self._conn.pgconn
        outcomes: list[Outcome] = []
        for name in prepared:
            failed: psycopg.Error | None = None  # the statement's preparation failed
            if name is not None:  # the statement's preparation comes first
                res = self._next(pg)
                if res is None:
                    raise e.InternalError("site: pipeline out of step (a result is missing)")
                if res.status != pq.ExecStatus.COMMAND_OK:  # failed or skipped: not prepared
                    self._names = {q: n for q, n in self._names.items() if n != name}
                    if res.status == pq.ExecStatus.FATAL_ERROR:
                        failed = e.error_from_result(res, encoding=self._conn.info.encoding)
                while self._next(pg) is not None:
                    pass
            res = self._next(pg)
            if res is None:
                raise e.InternalError("site: pipeline out of step (a result is missing)")
            status = res.status
            if failed is not None:  # (the execution itself was skipped)
                outcomes.append(Outcome(error=failed))
            elif status == pq.ExecStatus.FATAL_ERROR:
                outcomes.append(Outcome(error=e.error_from_result(
                    res, encoding=self._conn.info.encoding)))
            elif status == pq.ExecStatus.PIPELINE_ABORTED:
                outcomes.append(Outcome(aborted=True))
            else:
                rows = res.command_tuples
                outcomes.append(Outcome(rows=-1 if rows is None else rows))
            while self._next(pg) is not None:  # a statement's results end with a NULL
                pass
        sync = self._next(pg)
        if sync is None or sync.status != pq.ExecStatus.PIPELINE_SYNC:
            raise e.InternalError("site: pipeline out of step (no Sync where expected)")
        return outcomes

    def close(self) -> None:
        if self._entered and not self._batches:
            self._conn.pgconn.exit_pipeline_mode()
            self._entered = False

    def discard(self) -> None:
        while self._batches:
            self.collect()
        self.close()

    # -- I/O (the GIL is released while select() waits) ---------------------------------------
    @staticmethod
    def _flush(pg: pq.abc.PGconn) -> None:
        while pg.flush() == 1:
            readable, _, _ = select.select([pg.socket], [pg.socket], [], _WAIT_SECONDS)
            if readable:
                pg.consume_input()  # the server may wait for us to read before it reads on

    @staticmethod
    def _next(pg: pq.abc.PGconn) -> pq.abc.PGresult | None:
        while pg.is_busy():
            select.select([pg.socket], [], [], _WAIT_SECONDS)
            pg.consume_input()
        return pg.get_result()

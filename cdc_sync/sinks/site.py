"""`SiteWriter`: applies chunks of changes to one site database inside one open transaction.

Contract:
- `begin()` opens the target transaction; `apply(changes, begin)` applies a chunk set-based
  (one statement per run, see `_plan`); `commit(lsn, ts)` writes the site's progress for
  `source` in the same transaction and commits it: rows and progress become durable together,
  which is what makes apply exactly-once. `rollback()` forgets everything since `begin()`.
- A change the site rejects for its data (constraint, invalid value, missing column…) does not
  stop anything: the chunk (with the chunks before it since the last savepoint; chunks share
  one per `SAVEPOINT_EVERY`, to keep a huge transaction's subtransactions few) is retried run by
  run inside savepoints, a failing run is bisected down to the offending change, which is
  recorded in `cdc_sync.dead_letters` in the same transaction; every other change is applied.
  Connection and server failures (`OperationalError`) propagate: the caller reconnects and the
  stream is replayed.
- Tables whose conflict policy needs the local rows go through `_resolving.apply_resolved`:
  all their changes in a chunk form one run (mixed operations, repeated keys), which costs a
  read and a write round trip; before the first such run of a target transaction its key
  buckets are locked (`_locks`; every bucket when more chunks may follow: `final=False`), so
  replicators of different offices writing into this site never deadlock each other. The
  rest take the fast path (upserts; an update or key change of a row the site lacks is
  written as an insert when the whole row was sent, and logged as a conflict).
- With an outbox, one event row per change is written to `cdc_sync.outbox` in the same
  transaction.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg import pq, sql
from psycopg.types.json import Jsonb

from ..changes import UNCHANGED_TOAST, Change, Op, Table, TxBegin
from ..errors import SiteError
from ..protocol import (
    INVALID_LSN,
    TRUNCATE_CASCADE,
    TRUNCATE_RESTART_IDENTITY,
    Lsn,
    ReplicaIdentity,
)
from . import _sql
from ._ahead import AheadPipe, Outcome, Statement, dollar_params
from ._arrays import pack_columns, transpose
from ._locks import (
    LOCK_CLASS,
    LOCK_SQL,
    all_buckets,
    bucket_of,
    missing_sorted,
)
from ._plan import NEW_OF, OLD_OF, Run, by_table, one_table, per_chunk, plan_runs, sent_columns
from ._resolving import apply_resolved, resolved_keys
from ._rows import describe_change, key_dict
from ._sql import SiteTable
from .schema import register_source

log = logging.getLogger(__name__)

TableFilter = Callable[[Table], bool]

# A chunk of at least this many changes to keyed tables on the fast path is sent ahead of the
# previous chunk's results (`SiteWriter._send_ahead`); smaller ones are not worth a savepoint's
# round trip at the next boundary.
AHEAD_MIN_CHANGES = 1000
# Chunks after a target transaction's first share one savepoint per this many (sent ahead:
# cdc_ahead; applied at once: cdc_chunk). A savepoint is a subtransaction, and past 64 of them
# in one transaction every snapshot taken on the site overflows its subxid cache (visibility
# checks then read pg_subtrans) for as long as the transaction runs. At 8, a transaction of 2.5
# million rows stays under 64; the chunks since the savepoint are kept (at most 8) to apply
# them again after a rollback to it.
SAVEPOINT_EVERY = 8
TOMBSTONE_PURGE_INTERVAL = 60.0

# The column clocks of a key (merge_columns) go with its tombstone: the key is forgotten.
_PURGE_TOMBSTONES = dollar_params(
    "WITH gone AS (DELETE FROM cdc_sync.tombstones "
    "WHERE deleted_at < now() - make_interval(secs => %s::float8) RETURNING table_name, key) "
    "DELETE FROM cdc_sync.column_versions AS cv USING gone "
    "WHERE cv.table_name = gone.table_name AND cv.key = gone.key")
_ORIGIN_XACT_SETUP = dollar_params("SELECT pg_replication_origin_xact_setup(%s::pg_lsn, %s::timestamptz)")
_PROGRESS_UPSERT = dollar_params(_sql.PROGRESS_UPSERT.as_string(None))


def is_data_error(exc: BaseException) -> bool:
    """A rejection of the data itself, as opposed to a lost connection, a server failure or a
    lock conflict (lock timeout, deadlock), which are transient: the caller retries."""
    return isinstance(exc, psycopg.Error) and not isinstance(
        exc, (psycopg.OperationalError, psycopg.InterfaceError,
              psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected))


@dataclass
class SiteOptions:
    """What a writer needs beyond its connection (see `SiteWriter`)."""

    source: str
    site: str = ""
    wants: TableFilter = field(default=lambda _t: True)
    # table "schema.table" -> resolver, or None for the fast path (source wins, no lookups)
    resolver_for: Callable[[str], Any] = field(default=lambda _q: None)
    outbox: Callable[[str, TxBegin, Sequence[Change]], list[tuple[Any, ...]]] | None = None
    origin: str | None = None  # replication origin name tagging our writes
    tombstone_max_age: float = 7 * 86_400.0


@dataclass(frozen=True, slots=True)
class _AheadBatch:
    """A chunk sent ahead: its runs, its transaction, its update row-count checks (statement
    index in the batch, run, rows expected), and its place after savepoint cdc_ahead."""

    runs: list[Run]
    begin: TxBegin | None
    checks: list[tuple[int, Run, int]]
    after: int  # batches sent between the savepoint and this one (0: this one set it)

    @property
    def savepoint(self) -> bool:
        return self.after == 0


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A chunk applied at once (`_run_chunk`): what applying it again needs, and the writer's
    counters before it (restored when a rollback undoes it)."""

    runs: Sequence[Run]
    begin: TxBegin | None
    rejected: Sequence[tuple[Change, SiteError]]
    segments: Sequence[tuple[TxBegin | None, Sequence[Change]]]
    counters: tuple[int, int]  # dead_letters, conflicts


def _raise_transient(outcomes: Sequence[Outcome]) -> None:
    """Raise the first error of a batch when it is not about the data (a lost connection, a
    lock conflict): the worker's retry handles those, not dead letters."""
    for o in outcomes:
        if o.error is not None and not is_data_error(o.error):
            raise o.error


def _per_table_runs(changes: Sequence[Change]) -> list[Run]:
    """One `Run` per table per stretch between truncates, each table's changes in order (the
    resolving path's runs under `session_replication_role = replica`, `_merge_resolving`):
    `by_table`'s grouping, cut where the table changes."""
    out: list[Run] = []
    for oid, group in groupby(by_table(changes), key=_table_oid):
        chs = tuple(group)
        if oid is None:  # truncates stay barriers, one run each
            out.extend(Run(ch.op, None, (ch,)) for ch in chs)
        else:
            out.append(Run(Op.UPDATE, chs[0].table, chs, ()))
    return out


def _table_oid(ch: Change) -> int | None:
    return ch.table.oid if ch.table is not None else None


class SiteWriter:
    """One site connection and the cache of its table descriptions (see module docstring)."""

    def __init__(self, conn: psycopg.Connection[Any], source: str, *,
                 wants: TableFilter | None = None, options: SiteOptions | None = None) -> None:
        self.conn = conn
        # Our pipe (`AheadPipe`) prepares the fast path's statements under names of its own.
        # psycopg, once it has prepared statements of its own, sends DEALLOCATE ALL after every
        # rollback (to a savepoint too), which would drop ours in the middle of a transaction:
        # so psycopg prepares nothing on a site connection.
        conn.prepare_threshold = None
        self.opts = options or SiteOptions(source=source)
        self.source = source
        if wants is not None:
            self.opts.wants = wants
        self._tables: dict[int, tuple[Table, SiteTable | None | SiteError]] = {}
        self._in_tx = False
        self._origin_ready = False
        self._last_purge = time.monotonic()
        self._begin_of: dict[int, TxBegin] | None = None
        self._dirty = False  # the open target transaction holds applied changes
        self._deferred: list[Callable[[], None]] | None = None
        self._queries: dict[tuple[Any, ...], str] = {}
        # Chunks sent ahead of their results (see `_send_ahead`).
        self.ahead_min_changes = AHEAD_MIN_CHANGES
        self._pipe: AheadPipe | None = None
        self._ahead: deque[_AheadBatch] = deque()  # sent, results not read yet
        # The batches a rollback to savepoint cdc_ahead would undo, oldest first (settled or
        # not); the first one set the savepoint. Empty: the next batch sets a new one.
        self._window: list[_AheadBatch] = []
        self._ahead_sp = False  # savepoint cdc_ahead exists
        # Chunks applied at once since savepoint cdc_chunk, which exists while this is not
        # empty (`_run_chunk`).
        self._chunks: list[_Chunk] = []
        self._dollar: dict[str, bytes] = {}
        self.sent_ahead = 0  # batches sent ahead so far
        self.ahead_savepoints = 0  # savepoints they set
        # Under session_replication_role = replica (no FK checks, no triggers) changes of
        # different tables in one batch may be applied table by table.
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('session_replication_role') = 'replica', "
                        "current_setting('track_commit_timestamp')::bool")
            row = cur.fetchone()
        conn.rollback()
        self._replica_role = bool(row and row[0])
        # Whether the site records commit timestamps (the resolving path reads them).
        self.track_commit_ts = bool(row and row[1])
        self.dead_letters = 0
        self.conflicts = 0
        self._origins: dict[int, str] = {}
        # Key buckets held by the open target transaction (`_take_locks`), or all of them.
        self._held: set[int] = set()
        self._all_locked = False
        self._lock_first: list[tuple[str, Sequence[Any]]] = []  # to send before the next read
        # Set by the worker while a connection of its own holds every bucket (a streamed
        # transaction): other replicators are kept out by that one.
        self.locks_exempt = False
        # Whether another source applies into this site (`_resolving`: row versions), as read
        # by the open target transaction; None: not read yet.
        self.shared_site: bool | None = None
        if self.opts.origin:
            self._setup_origin(self.opts.origin)
        # Without the registry every source is taken as sharing the site.
        self.registry = register_source(conn, source)

    # -- replication origin -------------------------------------------------------------------
    def _setup_origin(self, name: str) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_replication_origin_oid(%s)", (name,))
                row = cur.fetchone()
                if row is None or row[0] is None:
                    cur.execute("SELECT pg_replication_origin_create(%s)", (name,))
                cur.execute("SELECT pg_replication_origin_session_setup(%s)", (name,))
            self.conn.commit()
            self._origin_ready = True
        except psycopg.errors.InsufficientPrivilege:
            self.conn.rollback()
            log.warning("site %s: cannot tag applied writes with replication origin %s "
                        "(needs superuser or EXECUTE on pg_replication_origin_*); "
                        "multi-directional loops cannot be prevented", self.opts.site, name)
        except psycopg.errors.UniqueViolation:
            self.conn.rollback()
            self._setup_origin(name)

    # -- progress -------------------------------------------------------------------------
    def read_progress(self) -> tuple[Lsn, Lsn | None]:
        """(applied LSN, snapshot LSN) recorded for our source; (0/0, None) when none."""
        with self.conn.cursor() as cur:
            cur.execute(_sql.PROGRESS_SELECT, (self.source,))
            row = cur.fetchone()
        self.conn.rollback()
        if row is None:
            return INVALID_LSN, None
        return Lsn.parse(row[0]), (Lsn.parse(row[2]) if row[2] else None)

    # -- transaction ----------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def begin(self) -> None:
        self._in_tx = True

    def commit(self, lsn: Lsn, commit_ts: datetime | None) -> None:
        self._settle()
        # One round trip: progress and COMMIT travel together (libpq's pipeline).
        ts = None if commit_ts is None else commit_ts.isoformat().encode()
        statements: list[Statement] = []
        now = time.monotonic()
        if now - self._last_purge >= TOMBSTONE_PURGE_INTERVAL:
            self._last_purge = now
            statements.append((_PURGE_TOMBSTONES, [str(self.opts.tombstone_max_age).encode()]))
        if self._origin_ready and ts is not None:
            # Our commit carries the source's commit time and position (commit-time LWW
            # compares pg_xact_commit_timestamp of rows written by different offices).
            statements.append((_ORIGIN_XACT_SETUP, [str(lsn).encode(), ts]))
        statements.append((_PROGRESS_UPSERT, [self.source.encode(), str(lsn).encode(), ts]))
        statements.append((b"COMMIT", None))
        self._send_now(statements)
        self._in_tx = self._dirty = self._ahead_sp = False
        self._chunks = []
        self._forget_locks()

    def _forget_locks(self) -> None:
        self.shared_site = None
        self._held = set()
        self._all_locked = False
        self._lock_first = []

    def rollback(self) -> None:
        self._in_tx = self._dirty = self._ahead_sp = False
        self._window.clear()
        self._chunks = []
        self._forget_locks()
        try:
            if self._pipe is not None:
                self._ahead.clear()
                self._pipe.discard()
            self.conn.rollback()
        except psycopg.OperationalError:
            pass

    def ping(self) -> None:
        """A round trip on an idle connection: raises OperationalError if it is gone."""
        assert not self._in_tx
        self.conn.execute("SELECT 1")
        self.conn.rollback()

    def savepoint(self, name: str) -> None:
        """A named savepoint in the open transaction (a streamed subtransaction starts)."""
        self._settle(release=True)
        self._release_chunks()
        self.conn.execute(sql.SQL("SAVEPOINT {}").format(sql.Identifier(name)))
        self._dirty = True  # chunks after it need their own savepoint, never a full rollback

    def rollback_to(self, name: str) -> None:
        """Undo everything since `savepoint(name)` (a streamed subtransaction rolled back)."""
        self._settle(release=True)
        self._release_chunks()
        self.conn.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(sql.Identifier(name)))

    def set_lock_timeout(self, milliseconds: int) -> None:
        """Session lock_timeout (0: wait forever); only between target transactions."""
        assert not self._in_tx
        self.conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{milliseconds}ms",))
        self.conn.commit()

    # -- apply ----------------------------------------------------------------------------
    def apply(self, changes: Sequence[Change], begin: TxBegin | None = None, *,
              final: bool = False) -> int:
        """Apply one chunk of one source transaction; return the changes written. `final`:
        nothing more will be applied in this target transaction before its commit (it then
        locks only the key buckets it needs, see `_locks`)."""
        return self._apply(changes, begin, [(begin, changes)] if begin is not None else [],
                           final)

    def apply_segments(self, segments: Sequence[tuple[TxBegin, Sequence[Change]]], *,
                       final: bool = False) -> int:
        """Apply the changes of several consecutive source transactions as one chunk.

        Runs then span transaction boundaries (still in order, see `_plan`), so a stream of
        small transactions costs a few statements per batch instead of a few per transaction.
        Each change keeps its own transaction for dead letters, conflicts and events.
        """
        if not segments:
            return 0
        if len(segments) == 1:
            return self.apply(segments[0][1], segments[0][0], final=final)
        self._begin_of = {id(ch): b for b, chs in segments for ch in chs}
        try:
            return self._apply([ch for _b, chs in segments for ch in chs], segments[-1][0],
                               segments, final)
        finally:
            self._begin_of = None

    def begin_for(self, change: Change, default: TxBegin | None) -> TxBegin | None:
        """The source transaction of `change` (inside `apply_segments`), else `default`."""
        if self._begin_of is None:
            return default
        return self._begin_of.get(id(change), default)

    def _apply(self, changes: Sequence[Change], begin: TxBegin | None,
               segments: Sequence[tuple[TxBegin | None, Sequence[Change]]],
               final: bool = False) -> int:
        wanted: list[Change] = []
        whole: Sequence[Change] = ()  # the chunk itself, when all of it is wanted
        keys: dict[int, tuple[int, ...]] = {}
        compact: set[int] = set()
        rejected: list[tuple[Change, SiteError]] = []
        if len(segments) > 1 and self._replica_role:
            changes = by_table(changes)
        only = one_table(changes)
        st0: SiteTable | None = None
        if only is not None:
            # One table, row changes only (the rule for big transactions): one lookup and no
            # per-change loop.
            try:
                st0 = self.site_table(only)
            except SiteError as exc:
                rejected = [(ch, exc) for ch in changes]
            else:
                if st0 is not None:
                    self._plan_table(st0, keys, compact)
                    # the chunk itself (not a copy): the plan and the run parameters are
                    # computed once for every site, keyed by the chunk's identity
                    whole = changes
            changes = ()
        # Runs of changes to one table are the rule: look the table up once per run of it.
        last_table: Table | None = None
        take = False
        resolving_only = self._replica_role and (
            not whole or (st0 is not None and self._resolver(st0) is not None))
        for ch in changes:
            op = ch.op
            if op is Op.MESSAGE:
                continue
            if op is Op.TRUNCATE:
                wanted.append(ch)
                last_table = None
                continue
            table = ch.table
            if table is not last_table:
                assert table is not None
                last_table = table
                try:
                    st = self.site_table(table)
                except SiteError as exc:
                    rejected.append((ch, exc))
                    last_table = None  # each change of it is rejected on its own
                    continue
                take = st is not None
                if st is not None:
                    self._plan_table(st, keys, compact)
                    resolving_only = resolving_only and self._resolver(st) is not None
            if take:
                wanted.append(ch)
        if resolving_only and (whole or wanted):
            # Every table on the resolving path: what `_merge_resolving(plan_runs(...))` gives,
            # without planning runs only to merge them again.
            runs = _per_table_runs(whole or wanted)
            fast = None
        else:
            runs = list(plan_runs(whole or wanted, keys, compact=compact))
            fast = self._fast_statements(runs)
            if fast is None:
                runs = self._merge_resolving(runs)
        if (fast is not None and not rejected and len(segments) <= 1
                and self.opts.outbox is None
                and sum(len(run.changes) for run in runs) >= self.ahead_min_changes):
            return self._send_ahead(runs, begin, *fast)
        self._settle()
        return self._run_chunk(runs, begin, rejected, segments, fast, final)

    def _run_chunk(self, runs: Sequence[Run], begin: TxBegin | None,
                   rejected: Sequence[tuple[Change, SiteError]],
                   segments: Sequence[tuple[TxBegin | None, Sequence[Change]]],
                   fast: _FastStatements | None, final: bool = False) -> int:
        """Apply `runs` now (nothing sent ahead is outstanding), isolating data errors; `fast`
        is `_fast_statements(runs)`.

        The first chunk of a target transaction needs no savepoint: on a data error the whole
        (otherwise empty) transaction is rolled back and the chunk isolated. Later ones share
        savepoint cdc_chunk, set again every SAVEPOINT_EVERY chunks; on a data error every
        chunk since it is rolled back and applied again, each run isolated (`_chunks`).
        """
        if self.opts.outbox is None:
            segments = ()  # (only the outbox needs them: not kept in `_chunks` for nothing)
        if not runs and not rejected and not segments:
            return 0  # nothing of this chunk for this site: no savepoint, nothing kept
        n = 0
        first = not self._dirty
        chunk = _Chunk(runs, begin, rejected, segments, (self.dead_letters, self.conflicts))
        head: list[str] = []
        if not first:
            if not self._chunks or len(self._chunks) >= SAVEPOINT_EVERY:
                if self._chunks:
                    head.append("RELEASE SAVEPOINT cdc_chunk")
                head.append("SAVEPOINT cdc_chunk")
                self._chunks = []
            self._chunks.append(chunk)
        # Runs on the fast path go through libpq's pipeline directly (`_send_now`: one round
        # trip, a few system calls); other runs that need no result back through psycopg's
        # pipeline (one round trip too, but a flush and a poll per statement).
        pipelined = not any(self._needs_results(run) for run in runs)
        with self.conn.cursor() as cur:
            try:
                if fast is not None:
                    statements, checks = fast
                    outcomes = self._send_now([(h.encode(), None) for h in head] + statements)
                    n = sum(len(run.changes) for run in runs)
                    self._write_missing_runs(cur, [run for i, run, rows in checks
                                                   if outcomes[len(head) + i].rows != rows], begin)
                elif pipelined:
                    deferred: list[Callable[[], None]] = []
                    self._deferred = deferred
                    try:
                        with self.conn.pipeline():
                            for statement in head:
                                cur.execute(statement)
                            for run in runs:
                                n += self._apply_run(cur, run, begin)
                    finally:
                        self._deferred = None
                    for check in deferred:
                        check()
                else:
                    self._take_locks(cur, runs, final)
                    if not first:
                        # Before savepoint cdc_chunk: a rollback to it must not release them.
                        for query, params in self._lock_first:
                            cur.execute(query, params)
                        self._lock_first = []
                    for statement in head:
                        cur.execute(statement)
                    for run in runs:
                        n += self._apply_run(cur, run, begin)
            except Exception as exc:
                if not (is_data_error(exc) or _is_user_error(exc)):
                    raise
                if first:
                    self.conn.rollback()
                    self._forget_locks()
                    self._take_locks(cur, runs, final)
                    again = [chunk]
                else:
                    cur.execute("ROLLBACK TO SAVEPOINT cdc_chunk")
                    again = self._chunks
                    self.dead_letters, self.conflicts = again[0].counters
                for c in again:
                    n = sum(self._apply_isolated(cur, run, c.begin) for run in c.runs)
                    self._finish_chunk(cur, c)
            else:
                self._finish_chunk(cur, chunk)
            self._dirty = True
        return n

    def _finish_chunk(self, cur: psycopg.Cursor[Any], chunk: _Chunk) -> None:
        """What follows a chunk's runs: its dead letters, and its events in the outbox."""
        for ch, err in chunk.rejected:
            self._dead_letter(cur, ch, chunk.begin, str(err), None)
        if self.opts.outbox is not None:
            for seg_begin, seg_changes in chunk.segments:
                if seg_begin is not None:
                    self._write_outbox(cur, seg_begin, seg_changes)

    def _release_chunks(self) -> None:
        """Make the chunks since savepoint cdc_chunk final (before a savepoint of another
        kind: a rollback to cdc_chunk must never undo what they cover)."""
        if self._chunks:
            self.conn.execute("RELEASE SAVEPOINT cdc_chunk")
            self._chunks = []

    # -- chunks sent ahead of their results ---------------------------------------------------
    # A big chunk on the fast path is sent without waiting for the previous one's results, so
    # the site never idles between chunks; at most two batches are outstanding. Every
    # SAVEPOINT_EVERY batches, one begins with "RELEASE SAVEPOINT cdc_ahead" (the
    # previous one) and "SAVEPOINT cdc_ahead"; the batches since are kept (`_window`). When a
    # batch's results show trouble, everything since the savepoint still in force is rolled
    # back: after an error that is the last savepoint at or before the failed batch (the server
    # skipped what followed it), after updates that found no row the last one sent. The
    # batches undone are then applied again as `_run_chunk` does it (dead letters, missing
    # rows); a troubled batch left before the savepoint only gets its missing rows written.
    def _fast_statements(self, runs: Sequence[Run]) -> _FastStatements | None:
        """The libpq statements of runs that are all on the fast path with packed parameters,
        with the update row-count checks (statement index, run, rows expected); else None."""
        if not runs:
            return None
        statements: list[Statement] = []
        checks: list[tuple[int, Run, int]] = []
        for run in runs:
            if run.op not in (Op.INSERT, Op.UPDATE, Op.DELETE) or run.table is None:
                return None
            st = self._site_table_or_none(run.table)
            if st is None or not st.key or self.opts.resolver_for(st.table.qualified) is not None:
                return None
            kind, cols, (packed, _) = _fast_statement(st, run)
            if packed is None:
                return None
            query = self._query(st, kind, cols, True)
            text = self._dollar.get(query)
            if text is None:
                text = self._dollar[query] = dollar_params(query)
            if run.op is Op.UPDATE:
                checks.append((len(statements), run, len(run.changes)))
            statements.append((text, [p.encode() for p in packed]))
        return statements, checks

    def _pipe_head(self) -> tuple[AheadPipe, list[Statement]]:
        """The connection's libpq pipe, and what to send first: BEGIN when no transaction is
        open and nothing is in flight (what psycopg sends before a first statement)."""
        if self._pipe is None:
            self._pipe = AheadPipe(self.conn)
        idle = self.conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
        return self._pipe, [(b"BEGIN", None)] if idle and not self._ahead else []

    def _send_now(self, statements: list[Statement]) -> list[Outcome]:
        """Send statements through libpq's pipeline and read their outcomes (nothing sent
        ahead may be outstanding); an error is raised (data errors too: the caller isolates
        them)."""
        pipe, head = self._pipe_head()
        pipe.send(head + statements)
        outcomes = pipe.collect()
        pipe.close()
        for o in outcomes:
            if not o.ok:
                raise o.error or e.InternalError("site: a statement was skipped without an error")
        return outcomes[len(head):]

    def _send_ahead(self, runs: Sequence[Run], begin: TxBegin | None,
                    statements: list[Statement], checks: list[tuple[int, Run, int]]) -> int:
        pipe, head = self._pipe_head()
        if self._chunks:  # chunks applied at once before: final now (see `_release_chunks`)
            head.append((b"RELEASE SAVEPOINT cdc_chunk", None))
            self._chunks = []
        savepoint = not self._window or self._window[-1].after >= SAVEPOINT_EVERY - 1
        if savepoint:
            if self._ahead_sp:
                head.append((b"RELEASE SAVEPOINT cdc_ahead", None))
            head.append((b"SAVEPOINT cdc_ahead", None))
            self.ahead_savepoints += 1
        offset = len(head)
        batch = _AheadBatch(list(runs), begin,
                            [(offset + i, run, rows) for i, run, rows in checks],
                            0 if savepoint else self._window[-1].after + 1)
        pipe.send(head + statements)
        self.sent_ahead += 1
        self._ahead.append(batch)
        self._window.append(batch)
        self._ahead_sp = self._dirty = True
        if len(self._ahead) > 1:
            self._settle_oldest()
        return sum(len(run.changes) for run in runs)

    def _settle(self, release: bool = False) -> None:
        """Settle every batch sent ahead, so the connection can be used through psycopg; with
        `release`, drop savepoint cdc_ahead too (before a savepoint of the caller's is made or
        rolled back to: it must not be nested in ours)."""
        while self._ahead:
            self._settle_oldest()
        if self._pipe is not None:
            self._pipe.close()
        # What the caller does next must not be undone by a later rollback to cdc_ahead that
        # would not apply it again: the next batch sets a savepoint of its own.
        self._window.clear()
        if release and self._ahead_sp:
            self.conn.execute("RELEASE SAVEPOINT cdc_ahead")
            self._ahead_sp = False

    def _settle_oldest(self) -> None:
        assert self._pipe is not None
        batch = self._ahead.popleft()
        outcomes = self._pipe.collect()
        failed = not all(o.ok for o in outcomes)
        missing = [run for i, run, rows in batch.checks
                   if outcomes[i].ok and outcomes[i].rows != rows]
        window = self._window
        at = next(i for i, b in enumerate(window) if b is batch)
        if not failed and not missing:
            if batch.savepoint:  # it released the previous savepoint: older batches are final
                del window[:at]
            return
        for _ in self._ahead:
            self._pipe.collect()
        self._ahead.clear()
        self._pipe.close()
        if failed:
            _raise_transient(outcomes)
        # The savepoint in force: after an error, the server skipped every later statement.
        last = at if failed else len(window) - 1
        start = max(i for i in range(last + 1) if window[i].savepoint)
        self._window = []
        with self.conn.cursor() as cur:
            cur.execute("ROLLBACK TO SAVEPOINT cdc_ahead")
            if start > at:  # `batch` stays applied: only its missing rows to write
                self._write_missing_runs(cur, missing, batch.begin)
            for b in window[start:]:
                self._run_chunk(b.runs, b.begin, (), (), self._fast_statements(b.runs))
            cur.execute("RELEASE SAVEPOINT cdc_ahead")  # (and any cdc_chunk set in it)
        self._ahead_sp = False
        self._chunks = []

    def _plan_table(self, st: SiteTable, keys: dict[int, tuple[int, ...]],
                    compact: set[int]) -> None:
        """Tell the planner how `st`'s rows are identified (`keys`; absent: keyless) and whether
        its whole-row updates of one key may be compacted (fast path only)."""
        if st.key:
            keys[st.table.oid] = st.key
            if st.upsert and self.opts.resolver_for(st.table.qualified) is None:
                compact.add(st.table.oid)

    def _needs_results(self, run: Run) -> bool:
        """Whether applying `run` reads results back (the resolving path does)."""
        if run.table is None or run.op is Op.TRUNCATE:
            return False
        st = self._site_table_or_none(run.table)
        return bool(st is not None and st.key and st.upsert
                    and self.opts.resolver_for(st.table.qualified) is not None)

    def _query(self, st: SiteTable, kind: str, cols: Sequence[int], packed: bool) -> str:
        """The statement text for a run, composed once per table shape and cached."""
        key = (st.table.oid, st.table.columns, st.types, st.key, st.upsert, kind, tuple(cols),
               packed)
        q = self._queries.get(key)
        if q is None:
            if kind == "insert":
                composed = _sql.insert_sql(st, cols, st.upsert, packed)
            elif kind == "update":
                composed = _sql.update_sql(st, cols, packed)
            else:
                composed = _sql.delete_sql(st, packed)
            q = self._queries[key] = composed.as_string(self.conn)
        return q

    def _execute_columns(self, cur: psycopg.Cursor[Any], st: SiteTable, kind: str,
                         cols: Sequence[int], params: _Params) -> None:
        """Run the `kind` statement over a run's column parameters: packed when possible."""
        packed, columns = params
        if packed is not None:
            cur.execute(self._query(st, kind, cols, True), packed)
        else:
            cur.execute(self._query(st, kind, cols, False), columns)

    def _apply_isolated(self, cur: psycopg.Cursor[Any], run: Run, begin: TxBegin | None) -> int:
        """Apply `run` in a savepoint; on a data error bisect it down to the bad change."""
        try:
            cur.execute("SAVEPOINT cdc_run")
            n = self._apply_run(cur, run, begin)
            cur.execute("RELEASE SAVEPOINT cdc_run")
            return n
        except Exception as exc:
            if not (is_data_error(exc) or _is_user_error(exc)):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT cdc_run")
            if len(run.changes) == 1:
                sqlstate = getattr(exc, "sqlstate", None)
                st = self._site_table_or_none(run.table)
                self._dead_letter(cur, run.changes[0], begin, _one_line(exc), sqlstate,
                                  st.key if st else ())
                return 0
            half = len(run.changes) // 2
            first = Run(run.op, run.table, run.changes[:half], run.columns)
            second = Run(run.op, run.table, run.changes[half:], run.columns)
            return self._apply_isolated(cur, first, begin) + self._apply_isolated(cur, second, begin)

    def _dead_letter(self, cur: psycopg.Cursor[Any], ch: Change, begin: TxBegin | None,
                     error: str, sqlstate: str | None, key: tuple[int, ...] = ()) -> None:
        info = describe_change(ch, key)
        begin = self.begin_for(ch, begin)
        log.warning("site %s: dead letter for %s %s: %s", self.opts.site, info["table"],
                    ch.op.value, error)
        cur.execute(
            "INSERT INTO cdc_sync.dead_letters (source, table_name, op, key, row_data, old_row, "
            "lsn, commit_ts, error, sqlstate) VALUES (%s, %s, %s, %s, %s, %s, %s::pg_lsn, %s, %s, %s)",
            (self.source, info["table"], ch.op.value, Jsonb(info["key"]),
             Jsonb(info["row"]), Jsonb(info["old"]),
             # A transaction still streaming has no commit position or time yet.
             str(begin.commit_lsn) if begin and begin.commit_lsn else None,
             begin.commit_ts if begin and begin.commit_lsn else None,
             error, sqlstate),
        )
        self.dead_letters += 1

    def _write_outbox(self, cur: psycopg.Cursor[Any], begin: TxBegin,
                      changes: Sequence[Change]) -> None:
        assert self.opts.outbox is not None
        rows = self.opts.outbox(self.source, begin, changes)
        if not rows:
            return
        ids, sources, topics, events, stamps = (list(c) for c in zip(*rows, strict=True))
        cur.execute(
            # WITH ORDINALITY … ORDER BY: `seq` follows the order of the events.
            "INSERT INTO cdc_sync.outbox (id, source, topic, event, commit_ts) "
            "SELECT i, s, t, e, c FROM unnest(%s::text[], %s::text[], %s::text[], %s::jsonb[], "
            "%s::timestamptz[]) WITH ORDINALITY AS u(i, s, t, e, c, n) ORDER BY n "
            "ON CONFLICT (id) DO NOTHING",
            (ids, sources, topics, events, stamps),
        )

    def _apply_run(self, cur: psycopg.Cursor[Any], run: Run, begin: TxBegin | None) -> int:
        if run.op is Op.TRUNCATE:
            ch = run.changes[0]
            tables = [t for t in ch.truncated if self._site_table_or_none(t) is not None]
            if tables:
                cur.execute(_sql.truncate_sql(
                    tables, bool(ch.truncate_options & TRUNCATE_RESTART_IDENTITY),
                    bool(ch.truncate_options & TRUNCATE_CASCADE)))
            return len(tables)
        assert run.table is not None
        st = self.site_table(run.table)
        assert st is not None
        if not st.key:
            return self._apply_keyless(cur, st, run)
        resolver = self._resolver(st)
        if resolver is not None:
            locks, self._lock_first = self._lock_first, []
            applied, conflicts = apply_resolved(self, cur, st, run.changes, begin, resolver,
                                                locks)
            self.conflicts += conflicts
            return applied
        return self._apply_fast(cur, st, run, begin)

    def _resolver(self, st: SiteTable) -> Any:
        """The table's resolver when its changes take the resolving path, else None."""
        if not (st.key and st.upsert):
            return None
        resolver = self.opts.resolver_for(st.table.qualified)
        if resolver is None or not getattr(resolver, "needs_local_rows", True):
            return None
        return resolver

    # -- what the resolving path needs (`_resolving.ResolveContext`) -------------------------
    @property
    def site_name(self) -> str:
        return self.opts.site

    def origin_names(self, cur: psycopg.Cursor[Any], idents: set[int]) -> dict[int, str]:
        """Replication origin names by id (cached; looked up again for an unknown id)."""
        if not idents <= self._origins.keys():
            cur.execute("SELECT roident, roname FROM pg_replication_origin")
            self._origins = {int(i): n for i, n in cur.fetchall()}
        return self._origins

    def _merge_resolving(self, runs: list[Run]) -> list[Run]:
        """Runs of tables on the resolving path, merged into one run per table (per stretch
        between truncates; adjacent runs only when tables must stay in order, without
        `session_replication_role = replica`): `apply_resolved` takes mixed operations and
        repeated keys, and costs two round trips per run whatever its size."""
        out: list[Run | list[Change]] = []
        tables: list[Table | None] = []
        open_at: dict[int, int] = {}
        for run in runs:
            t = run.table
            if t is None or run.op is Op.TRUNCATE or run.op is Op.MESSAGE:
                open_at.clear()
                out.append(run)
                tables.append(None)
                continue
            st = self._site_table_or_none(t)
            if st is None or self._resolver(st) is None:
                if not self._replica_role:
                    open_at.clear()
                out.append(run)
                tables.append(None)
                continue
            at = open_at.get(t.oid)
            if at is None or (not self._replica_role and at != len(out) - 1):
                open_at[t.oid] = len(out)
                out.append(list(run.changes))
                tables.append(t)
            else:
                merged = out[at]
                assert isinstance(merged, list)
                merged.extend(run.changes)
        return [r if isinstance(r, Run) else Run(Op.UPDATE, tables[i], tuple(r), ())
                for i, r in enumerate(out)]

    def _take_locks(self, cur: psycopg.Cursor[Any], runs: Sequence[Run], final: bool) -> None:
        """The key buckets (`_locks`) of the resolving runs of this chunk, before any write:
        just those when this chunk is the target transaction's last (`final`), else every
        bucket; never any again later in the same target transaction."""
        if self._all_locked or self.locks_exempt:
            return
        needed: set[int] = set()
        for run in runs:
            if run.table is None or run.op is Op.TRUNCATE:
                continue
            st = self._site_table_or_none(run.table)
            if st is None or self._resolver(st) is None:
                continue
            name = st.table.qualified
            needed.update(bucket_of(name, k) for k in resolved_keys(st, run.changes))
        if not needed:
            return
        if final:
            take = missing_sorted(needed, self._held)
        else:
            take = missing_sorted(all_buckets(), self._held)
            self._all_locked = True
        if take:
            # Sent with the first resolving run's read, in its round trip (`apply_resolved`).
            self._lock_first = [(LOCK_SQL, (LOCK_CLASS, take))]
            self._held.update(take)

    def _apply_fast(self, cur: psycopg.Cursor[Any], st: SiteTable, run: Run,
                    begin: TxBegin | None) -> int:
        changes = run.changes
        kind, cols, params = _fast_statement(st, run)
        if run.op is Op.UPDATE:
            ucur = self.conn.cursor() if self._deferred is not None else cur
            self._execute_columns(ucur, st, kind, cols, params)

            def check() -> None:
                # An update that found no row: the site lacks it (see _write_missing).
                if ucur.rowcount != len(changes):
                    self._write_missing(cur, st, run, begin)
                if ucur is not cur:
                    ucur.close()

            if self._deferred is not None:
                self._deferred.append(check)
            else:
                check()
        else:
            self._execute_columns(cur, st, kind, cols, params)
        return len(changes)

    def _write_missing_runs(self, cur: psycopg.Cursor[Any], runs: Sequence[Run],
                            begin: TxBegin | None) -> None:
        """`_write_missing` for update runs of the fast path whose row counts (read from the
        pipe) fell short."""
        for run in runs:
            assert run.table is not None
            st = self.site_table(run.table)
            assert st is not None
            self._write_missing(cur, st, run, begin)

    def _write_missing(self, cur: psycopg.Cursor[Any], st: SiteTable, run: Run,
                       begin: TxBegin | None) -> None:
        """Updates that found no row: insert the row when it was sent whole (source wins)."""
        new_keys = [tuple(c.new[i] for i in st.key) for c in run.changes]  # type: ignore[index]
        cur.execute(_sql.existing_keys_sql(st), transpose(new_keys))
        present = {tuple(r) for r in cur.fetchall()}
        missing = [c for c, k in zip(run.changes, new_keys, strict=True) if k not in present]
        whole = [c for c in missing if UNCHANGED_TOAST not in c.new]  # type: ignore[operator]
        if whole:
            cols = range(len(st.table.columns))
            cur.execute(_sql.insert_sql(st, cols, st.upsert),
                        [[c.new[i] for c in whole] for i in cols])  # type: ignore[index]
        for c in missing:
            self.log_conflict(cur, st, c, begin, "update_missing", None,
                              "source_wins", "incoming_wins" if c in whole else "local_wins")

    def log_conflict(self, cur: psycopg.Cursor[Any], st: SiteTable, ch: Change,
                     begin: TxBegin | None, kind: str, local: dict[str, Any] | None,
                     strategy: str, outcome: str) -> None:
        info = describe_change(ch, st.key)
        begin = self.begin_for(ch, begin)
        cur.execute(
            "INSERT INTO cdc_sync.conflicts (source, table_name, kind, key, local_row, "
            "incoming_row, strategy, outcome, lsn, commit_ts) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::pg_lsn, %s)",
            (self.source, st.table.qualified, kind, Jsonb(info["key"]), Jsonb(local),
             Jsonb(info["row"] if ch.op is not Op.DELETE else info["old"]), strategy, outcome,
             str(begin.commit_lsn) if begin else None, begin.commit_ts if begin else None),
        )
        self.conflicts += 1

    def _apply_keyless(self, cur: psycopg.Cursor[Any], st: SiteTable, run: Run) -> int:
        # Keyless tables (REPLICA IDENTITY FULL, no unique key on the site): one statement per
        # row, since each must touch exactly one of possibly identical rows.
        for ch in run.changes:
            if ch.op is Op.INSERT:
                assert ch.new is not None
                every = range(len(st.table.columns))
                cur.execute(_sql.insert_sql(st, every, False), [[ch.new[i]] for i in every])
                continue
            assert ch.old is not None
            match = sent_columns(ch.old)
            old_vals = [ch.old[i] for i in match]
            if ch.op is Op.DELETE:
                cur.execute(_sql.keyless_delete_sql(st, match), old_vals)
            else:
                assert ch.new is not None
                cols = sent_columns(ch.new)
                cur.execute(_sql.keyless_update_sql(st, cols, match),
                            [ch.new[i] for i in cols] + old_vals)
        return len(run.changes)

    # -- site catalog ---------------------------------------------------------------------
    def site_table(self, table: Table) -> SiteTable | None:
        """The site's description of `table`, or None when this site does not take it.

        Raises `SiteError` when the site's table cannot take the source's rows.
        """
        cached = self._tables.get(table.oid)
        if cached is None or cached[0] is not table:
            try:
                st: SiteTable | None | SiteError = (
                    self._describe(table) if self.opts.wants(table) else None)
            except SiteError as exc:
                st = exc
            self._tables[table.oid] = cached = (table, st)
        result = cached[1]
        if isinstance(result, SiteError):
            raise result
        return result

    def _site_table_or_none(self, table: Table | None) -> SiteTable | None:
        if table is None:
            return None
        try:
            return self.site_table(table)
        except SiteError:
            return None

    def forget_tables(self) -> None:
        self._tables.clear()

    def _describe(self, table: Table) -> SiteTable:
        self._settle()
        with self.conn.cursor() as cur:
            cur.execute("SAVEPOINT cdc_describe")
            cur.execute(_sql.SITE_COLUMNS, (table.schema, table.name))
            rows = cur.fetchall()
            if not rows:
                cur.execute("RELEASE SAVEPOINT cdc_describe")
                raise SiteError(f"table {table.qualified} does not exist on site "
                                f"{self.opts.site} (run `cdc-sync init`)")
            oid = rows[0][0]
            site_types = {name: typ for _oid, name, typ, _gen in rows}
            generated = {name for _oid, name, _typ, gen in rows if gen}
            cur.execute(_sql.SITE_UNIQUE_INDEXES, (oid,))
            uniques: list[tuple[bool, list[str]]] = [(r[0], r[1]) for r in cur.fetchall()]
            cur.execute("RELEASE SAVEPOINT cdc_describe")
        types: list[str] = []
        for col in table.columns:
            if col not in site_types:
                raise SiteError(f"site {self.opts.site} is missing column {table.qualified}.{col}")
            if col in generated:
                raise SiteError(f"column {table.qualified}.{col} is generated on site "
                                f"{self.opts.site} but not on the source")
            types.append(site_types[col])
        index = {c: i for i, c in enumerate(table.columns)}
        key: tuple[int, ...] = ()
        upsert = False
        if table.key and table.replica_identity is not ReplicaIdentity.FULL:
            key = table.key
        # A site unique index on exactly the key columns makes ON CONFLICT possible; with
        # REPLICA IDENTITY FULL the site's primary key (or any unique index) identifies rows.
        for _is_pk, cols in uniques:
            if all(c in index for c in cols):
                idx = tuple(index[c] for c in cols)
                if not key:
                    key = idx
                if set(idx) == set(key):
                    key, upsert = idx, True
                    break
        return SiteTable(table, tuple(types), key, upsert)


_Params = tuple[list[str] | None, list[list[Any]]]
# A chunk's libpq statements and its update row-count checks (statement index, run, rows
# expected): `SiteWriter._fast_statements`.
_FastStatements = tuple[list[Statement], list[tuple[int, Run, int]]]
# Runs' parameters, shared by the site workers (`_plan.per_chunk`): keyed by the run's
# changes tuple, its key and its value columns.
_SHARED_PARAMS: dict[tuple[int, Any], tuple[Sequence[Change], Any]] = {}


def run_params(changes: Sequence[Change], key: tuple[int, ...], cols: tuple[int, ...]) -> _Params:
    """The parameters of a run's statement: for each of `key` (the row's old key, for updates
    and deletes) and `cols` (new values), the column's values in order; packed if possible.

    Inserts pass no key; deletes no columns. Computed once per run for all sites.
    """
    return per_chunk(_SHARED_PARAMS, changes, (key, cols),
                     lambda: _build_params(changes, key, cols))


def _fast_statement(st: SiteTable, run: Run) -> tuple[str, tuple[int, ...], _Params]:
    """The fast path's statement for a row-change run of a keyed table: its kind (for
    `SiteWriter._query`), the columns it writes and its parameters."""
    if run.op is Op.INSERT:
        cols = tuple(range(len(st.table.columns)))
        return "insert", cols, run_params(run.changes, (), cols)
    if run.op is Op.UPDATE:
        return "update", run.columns, run_params(run.changes, st.key, run.columns)
    assert run.op is Op.DELETE, run.op
    return "delete", (), run_params(run.changes, st.key, ())


def _build_params(changes: Sequence[Change], key: tuple[int, ...], cols: tuple[int, ...]
                  ) -> _Params:
    columns: list[list[Any]] = []
    if key:
        olds = list(map(OLD_OF, changes))
        if olds.count(None):  # updates without an old key: the key did not change
            olds = [c.old if c.old is not None else c.new for c in changes]
        columns += [list(map(itemgetter(i), olds)) for i in key]
    if cols:
        news = list(map(NEW_OF, changes))
        columns += [list(map(itemgetter(i), news)) for i in cols]
    packed = pack_columns(columns)
    return packed, columns if packed is None else []


def _is_user_error(exc: BaseException) -> bool:
    """Errors raised by user code (a merge function) while resolving: dead-letter them."""
    return not isinstance(exc, (psycopg.Error, SiteError)) and isinstance(exc, Exception) \
        and getattr(exc, "_cdc_user_error", False)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["SiteOptions", "SiteWriter", "is_data_error",
           "key_dict", "sql"]

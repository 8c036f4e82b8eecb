"""Helpers of the end-to-end suite: a real webhook receiver, the connector's configuration
file, pgbench, and the independent count of source changes from a `test_decoding` slot.

`Receiver` is a stdlib `ThreadingHTTPServer` on 127.0.0.1 (port 0) in a thread. For every
POST it reads the raw body, recomputes `sha256=<HMAC-SHA256(secret, body)>` and compares it
with `X-CDC-Signature` (a missing or wrong signature is recorded in `problems`, answered 401,
and fails the test), then answers:

- 500 while `dead` is set;
- 500 for every `fail_every`-th request (deterministic, by arrival number);
- for every `slow_every`-th request (offset `slow_offset`): records the batch, then sleeps
  `slow_seconds` (past the connector's `timeout_seconds`) before answering 200: the receiver
  has the events, the client gave up and delivers them again;
- after `hold_next()`: records the next batch that would be acknowledged, sets `held`, and
  keeps the request open until `release()` (the test SIGKILLs the replicator meanwhile:
  delivered but never acknowledged);
- otherwise 200.

Every recorded request is a `Delivery` (arrival number, events in body order), appended under
the lock in arrival order: that order is what "first delivery" means in the checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cdc_sync.protocol import Lsn
from tests.integration.helpers import connect, write_config

SIGNATURE_HEADER = "X-CDC-Signature"
EVENT_FIELDS = ("id", "source", "topic", "table", "op", "lsn", "commit_ts", "key", "row", "old")
HEARTBEAT_PREFIX = "cdc_sync.heartbeat"


# -- the receiver ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    number: int                     # arrival number of the request (1-based)
    events: list[dict[str, Any]]    # in body order


@dataclass
class Receiver:
    secret: str
    fail_every: int = 0             # 0: never; n: every n-th request gets a 500
    slow_every: int = 0             # 0: never; n: request k with k % n == slow_offset sleeps
    slow_offset: int = 0
    slow_seconds: float = 0.0
    requests: int = 0               # POSTs with a complete body
    failed: int = 0                 # answered 500
    slow: int = 0                   # answered late (after the client's timeout)
    deliveries: list[Delivery] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dead: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._hold_armed = False
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def hold_next(self) -> None:
        """Hold the next batch that would be acknowledged open until `release()`."""
        with self.lock:
            self.held.clear()
            self._released.clear()
            self._hold_armed = True

    def release(self) -> None:
        with self.lock:
            self._hold_armed = False
        self._released.set()

    def snapshot(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)

    def delivered_ids(self) -> set[str]:
        with self.lock:
            return {e["id"] for d in self.deliveries for e in d.events}

    # -- the handler's decisions -------------------------------------------------------------
    def _check_signature(self, header: str | None, body: bytes) -> str | None:
        if header is None:
            return "no X-CDC-Signature header"
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(header, expected):
            return f"bad signature {header[:20]}... (expected {expected[:20]}...)"
        return None

    def handle(self, path: str, headers: Message, body: bytes) -> tuple[int, float]:
        """Decide the answer to one complete POST: (status, seconds to wait first)."""
        problem = None
        events: list[dict[str, Any]] = []
        if path != "/hook":
            problem = f"POST to {path}"
        elif headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            problem = f"Content-Type {headers.get('Content-Type')!r}"
        else:
            problem = self._check_signature(headers.get(SIGNATURE_HEADER), body)
        if problem is None:
            try:
                doc = json.loads(body)
                events = doc["events"]
                if set(doc) != {"events"} or not isinstance(events, list) or not events:
                    problem = f"unexpected body shape: keys {sorted(doc)}"
                else:
                    for e in events:
                        if not isinstance(e, dict) or set(e) != set(EVENT_FIELDS):
                            problem = f"an event with fields {sorted(e)}"
                            break
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"body is not {{'events': [...]}} JSON: {exc!r}"
        with self.lock:
            self.requests += 1
            number = self.requests
            if problem is not None:
                self.problems.append(f"request {number}: {problem}")
                return 401, 0.0
            if self.dead.is_set() or (self.fail_every and number % self.fail_every == 0):
                self.failed += 1
                return 500, 0.0
            self.deliveries.append(Delivery(number, events))
            if self.slow_every and number % self.slow_every == self.slow_offset:
                self.slow += 1
                return 200, self.slow_seconds
            if self._hold_armed:
                self._hold_armed = False
                self.held.set()
                return 200, -1.0   # -1: until released
            return 200, 0.0

    # -- the server --------------------------------------------------------------------------
    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length)
                except (OSError, ValueError):
                    self.close_connection = True
                    return
                if len(body) < length:  # the client died mid-request
                    self.close_connection = True
                    return
                status, wait = receiver.handle(self.path, self.headers, body)
                if wait < 0:
                    receiver._released.wait(60)
                elif wait > 0:
                    time.sleep(wait)
                payload = b'{"ok": true}' if status < 300 else b'{"error": "nope"}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                except OSError:  # the client gave up (timeout) or was killed
                    self.close_connection = True

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)


@contextlib.contextmanager
def receiving(secret: str, **kwargs: Any) -> Iterator[Receiver]:
    receiver = Receiver(secret, **kwargs).start()
    try:
        yield receiver
    finally:
        receiver.stop()


# -- checks over what was received -------------------------------------------------------------

def position_key(event: dict[str, Any]) -> tuple[Lsn, tuple[int, ...]]:
    """(commit LSN, position in the transaction) of an event, from its id; the id's LSN must
    be the event's `lsn`."""
    prefix = f"{event['source']}/{event['lsn']}/"
    assert event["id"].startswith(prefix), f"id {event['id']} does not start with {prefix}"
    position = tuple(int(p) for p in event["id"][len(prefix):].split("."))
    return Lsn.parse(event["lsn"]), position


@dataclass
class Received:
    first: dict[str, dict[str, Any]]   # id -> the event as first delivered
    order: list[str]                   # ids in order of first delivery
    duplicates: int                    # redelivered events (all identical to the first)


def analyse(deliveries: list[Delivery]) -> Received:
    """Distinct events by id; asserts every redelivery is identical to the first delivery and
    that first deliveries come in non-decreasing (commit LSN, position) order."""
    first: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    duplicates = 0
    last: tuple[Lsn, tuple[int, ...]] | None = None
    last_id = None
    for delivery in deliveries:
        for event in delivery.events:
            seen = first.get(event["id"])
            if seen is not None:
                duplicates += 1
                assert event == seen, (f"request {delivery.number} redelivered {event['id']} "
                                       f"with different content: {event} vs {seen}")
                continue
            key = position_key(event)
            assert last is None or key >= last, (
                f"request {delivery.number}: first delivery of {event['id']} comes after "
                f"{last_id}: not in (lsn, position) order")
            last, last_id = key, event["id"]
            first[event["id"]] = event
            order.append(event["id"])
    return Received(first, order, duplicates)


# -- configuration -----------------------------------------------------------------------------

def write_hook_config(path: Path, data: Mapping[str, Any], connector: Mapping[str, Any]) -> Path:
    """`write_config` plus one `[[connectors]]` entry (values are written as TOML literals:
    strings quoted, so `"${HOOK_SECRET}"` stays a reference for the replicator to expand)."""
    write_config(path, data)
    lines = ["", "[[connectors]]"]
    for key, value in connector.items():
        lines.append(f"{key} = {json.dumps(value)}")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return path


# -- pgbench -----------------------------------------------------------------------------------

def pgbench_path(bindir: Path) -> Path | None:
    for candidate in (bindir / "pgbench", Path("/usr/lib/postgresql/15/bin/pgbench")):
        if candidate.is_file():
            return candidate
    found = shutil.which("pgbench")
    return Path(found) if found else None


def pgbench(program: Path, dsn: str, *args: str, timeout: float = 120) -> None:
    proc = subprocess.run([str(program), *args, dsn], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"pgbench {' '.join(args)} failed: {proc.stderr[-2000:]}"


# -- the independent count: a test_decoding slot -----------------------------------------------

_TABLE_LINE = re.compile(r"^table (?P<table>[^:]+): (?P<op>INSERT|UPDATE|DELETE|TRUNCATE):"
                         r"(?P<rest>.*)$", re.DOTALL)
_MESSAGE_LINE = re.compile(r"^message: transactional: \d prefix: (?P<prefix>[^,]*), sz: \d+ "
                           r"content:", re.DOTALL)
_INT_COLUMN = re.compile(r"(?:^| )(?P<name>\w+)\[(?:integer|bigint|smallint)\]:(?P<value>-?\d+)")


Signature = tuple[str, str, tuple[tuple[str, int], ...]]   # (topic, op, integer columns)


def create_audit_slot(dsn: str, slot: str = "audit") -> None:
    with connect(dsn) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))


def audit_changes(dsn: str, slot: str = "audit") -> Counter[Signature]:
    """Consume the test_decoding slot: a multiset of (topic, op, integer columns of the new row)
    per row change and per logical message (heartbeats left out)."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, "
            "'include-xids', '0')", (slot,)).fetchall()
    changes: Counter[Signature] = Counter()
    for (data,) in rows:
        m = _TABLE_LINE.match(data)
        if m is not None:
            op = m["op"].lower()
            ints: tuple[tuple[str, int], ...] = ()
            if op in ("insert", "update"):
                ints = tuple(sorted((c["name"], int(c["value"]))
                                    for c in _INT_COLUMN.finditer(m["rest"])))
            changes[(m["table"], op, ints)] += 1
            continue
        m = _MESSAGE_LINE.match(data)
        if m is not None:
            if m["prefix"] != HEARTBEAT_PREFIX:
                changes[(m["prefix"], "message", ())] += 1
            continue
        assert data.startswith(("BEGIN", "COMMIT")), f"unexpected test_decoding line {data!r}"
    return changes


def event_signature(event: dict[str, Any]) -> Signature:
    """The `audit_changes` signature of a received event."""
    ints: tuple[tuple[str, int], ...] = ()
    if event["op"] in ("insert", "update") and event["table"] is not None:
        ints = tuple(sorted((k, v) for k, v in event["row"].items()
                            if isinstance(v, int) and not isinstance(v, bool)))
    return event["topic"], event["op"], ints


def by_table_op(signatures: Counter[Signature]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for (topic, op, _ints), n in signatures.items():
        out[(topic, op)] += n
    return out

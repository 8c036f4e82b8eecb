"""Capture real replication frames from PostgreSQL 15 into `tests/protocol/captured.json`.

Run by hand, not by pytest (the protocol tests read the JSON it writes)::

    .venv/bin/python tests/protocol/capture_payloads.py postgresql://postgres@127.0.0.1:55440/postgres

The server must be PostgreSQL 15 with `wal_level = logical`; the user must be a superuser
(replication origins). `track_commit_timestamp = on` is not needed. Use `wal_sender_timeout =
4s` or so: the walsender asks for a reply after half of it, which captures a keepalive with
`reply_requested` set. A throwaway server (run as the postgres user, not root)::

    D=$(mktemp -d /tmp/pgproto.XXXX); chown postgres $D
    runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D $D/data -A trust -U postgres
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D $D/data -l $D/log \\
        -o "-p 55440 -c wal_level=logical -c listen_addresses=127.0.0.1 -k $D \\
            -c wal_sender_timeout=4s" start

What it does: (re)creates schema `cdc_capture` (an enum type, tables with REPLICA IDENTITY
DEFAULT and FULL, a TOASTed column with STORAGE EXTERNAL, a parent/child pair) and publication
`cdc_capture`; creates two temporary pgoutput slots; runs the steps of `STEPS` one by one; then
streams each slot with `START_REPLICATION … (proto_version '1', publication_names 'cdc_capture',
messages 'true')`, the second one with `binary 'true'` as well (it is created just before the
`binary` step, so it holds that step only). Each CopyData frame is stored as hex with the step
it belongs to (matched by the LSNs taken after every step), so tests can pick frames by step.
At the end it sends a standby status update built by `encode_standby_status` and records the
`confirmed_flush_lsn` the server then reports, which checks that encoder against the server.
Everything it created is dropped again; temporary slots go with their connections.
"""

from __future__ import annotations

import json
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import pq
from psycopg.pq.abc import PGconn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cdc_sync.protocol import (
    Begin,
    Commit,
    Lsn,
    Message,
    PrimaryKeepalive,
    XLogData,
    datetime_to_pg_timestamp,
    decode_copy_data,
    decode_message,
    encode_standby_status,
)

OUT = Path(__file__).with_name("captured.json")
SCHEMA = "cdc_capture"
ORIGIN = "cdc_capture_o1"
TEXT_SLOT = "cdc_capture_text"
BINARY_SLOT = "cdc_capture_binary"
OPTIONS = f"proto_version '1', publication_names '{SCHEMA}', messages 'true'"
BINARY_OPTIONS = OPTIONS + ", binary 'true'"
END_MARKER = b"end"
KEEPALIVE_WAIT = 15.0

# The SQL spells out schema cdc_capture (SCHEMA) and the marker (END_MARKER): nothing is built.
# items.big is TOASTed: 3200 bytes of md5 hex, stored out of line (STORAGE EXTERNAL, no
# compression).

SETUP = """
DROP PUBLICATION IF EXISTS cdc_capture;
DROP SCHEMA IF EXISTS cdc_capture CASCADE;
CREATE SCHEMA cdc_capture;
CREATE TYPE cdc_capture.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE cdc_capture.items (
    id int PRIMARY KEY, name text, mood cdc_capture.mood, code varchar(12), amount numeric(10, 2),
    note text, big text);
ALTER TABLE cdc_capture.items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE cdc_capture.ledger (id int, entry text, amount numeric);
ALTER TABLE cdc_capture.ledger REPLICA IDENTITY FULL;
CREATE TABLE cdc_capture.parent (id int PRIMARY KEY);
CREATE TABLE cdc_capture.child (
    id serial PRIMARY KEY, parent_id int REFERENCES cdc_capture.parent);
CREATE TABLE cdc_capture.samples (
    id int PRIMARY KEY, label text, mood cdc_capture.mood, amount numeric(10, 2), flag bool,
    at timestamptz, data bytea, missing text);
CREATE PUBLICATION cdc_capture FOR TABLES IN SCHEMA cdc_capture;
"""


@dataclass(frozen=True)
class Step:
    name: str
    note: str
    sql: str


STEPS = [
    Step("insert_items", "two inserts: a NULL, a TOASTed 3200-byte value, non-ASCII text; "
         "Type (enum) and Relation first",
         "BEGIN;"
         "INSERT INTO cdc_capture.items VALUES (1, 'alpha', 'happy', 'A-1', 12.5, NULL, "
         "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 100) AS i));"
         "INSERT INTO cdc_capture.items VALUES "
         "(2, 'beta', 'sad', 'B-2', -3.25, 'grüße ✓', 'small');"
         "COMMIT;"),
    Step("update_toast", "update leaving the TOASTed column alone: new tuple has 'u', no old",
         "UPDATE cdc_capture.items SET name = 'alpha2', amount = 13 WHERE id = 1;"),
    Step("update_key", "update changing the primary key: old key 'K' (non-key columns 'n')",
         "UPDATE cdc_capture.items SET id = 10 WHERE id = 2;"),
    Step("delete_key", "delete with REPLICA IDENTITY DEFAULT: old key 'K'",
         "DELETE FROM cdc_capture.items WHERE id = 10;"),
    Step("ledger_full", "insert, update, delete with REPLICA IDENTITY FULL: old row 'O'",
         "BEGIN;"
         "INSERT INTO cdc_capture.ledger VALUES (1, 'open', 100.5);"
         "UPDATE cdc_capture.ledger SET amount = 99 WHERE id = 1;"
         "DELETE FROM cdc_capture.ledger WHERE id = 1;"
         "COMMIT;"),
    Step("message_tx", "a transactional pg_logical_emit_message between two inserts",
         "BEGIN;"
         "INSERT INTO cdc_capture.ledger VALUES (2, 'before', NULL);"
         "SELECT pg_logical_emit_message(true, 'cdc_capture', 'transactional content');"
         "INSERT INTO cdc_capture.ledger VALUES (3, 'after', 1);"
         "COMMIT;"),
    Step("message_nontx", "a non-transactional message with bytea content: no Begin/Commit",
         "SELECT pg_logical_emit_message(false, 'cdc_capture', '\\x00ff10'::bytea);"),
    Step("parent_child", "rows for the truncate",
         "BEGIN;"
         "INSERT INTO cdc_capture.parent VALUES (1);"
         "INSERT INTO cdc_capture.child (parent_id) VALUES (1);"
         "COMMIT;"),
    Step("truncate_cascade", "TRUNCATE parent RESTART IDENTITY CASCADE: options 3, two oids",
         "TRUNCATE cdc_capture.parent RESTART IDENTITY CASCADE;"),
    Step("truncate_plain", "TRUNCATE ledger: options 0",
         "TRUNCATE cdc_capture.ledger;"),
    Step("origin", "a write from a session with a replication origin and "
         "pg_replication_origin_xact_setup('0/12345678', '2020-01-02 03:04:05+00'): "
         "Origin after Begin, Begin carries the origin timestamp",
         "BEGIN;"
         "SELECT pg_replication_origin_xact_setup('0/12345678', '2020-01-02 03:04:05+00');"
         "INSERT INTO cdc_capture.items VALUES (3, 'from-origin', 'ok', 'O-3', 0, 'o', 'x');"
         "COMMIT;"),
    Step("many_rows", "seven inserts in one transaction (chunking)",
         "INSERT INTO cdc_capture.items (id, name) SELECT g, 'row ' || g "
         "FROM generate_series(100, 106) AS g;"),
    Step("binary", "binary-session step: every non-NULL value 'b' there, 't' here",
         "BEGIN;"
         "INSERT INTO cdc_capture.samples VALUES (1, 'bin', 'ok', 1.5, true, "
         "'2024-02-03 04:05:06+00', '\\xdeadbeef', NULL);"
         "UPDATE cdc_capture.items SET note = 'bin-update' WHERE id = 1;"
         "COMMIT;"),
    Step("end", "non-transactional end marker 'end'",
         "SELECT pg_logical_emit_message(false, 'cdc_capture', 'end');"),
]


def main(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        assert version is not None
        conn.execute(SETUP.encode())
        conn.execute(b"SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin "
                     b"WHERE roname = %s", [ORIGIN])
        conn.execute(b"SELECT pg_replication_origin_create(%s)", [ORIGIN])

        text_rep = _replication(dsn, TEXT_SLOT)
        binary_rep: psycopg.Connection[tuple[object, ...]] | None = None
        boundaries: list[tuple[str, Lsn]] = []
        for step in STEPS:
            if step.name == "binary":
                binary_rep = _replication(dsn, BINARY_SLOT)
            if step.name == "origin":
                with psycopg.connect(dsn, autocommit=True) as origin_conn:
                    origin_conn.execute(b"SELECT pg_replication_origin_session_setup(%s)",
                                        [ORIGIN])
                    origin_conn.execute(step.sql.encode())
                    origin_conn.execute(b"SELECT pg_replication_origin_session_reset()")
            else:
                conn.execute(step.sql.encode())
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert row is not None
            boundaries.append((step.name, Lsn.parse(row[0])))
        assert binary_rep is not None

        frames = _stream(text_rep, TEXT_SLOT, OPTIONS, "text", boundaries)
        status = _confirm(text_rep, conn, frames)
        frames += _stream(binary_rep, BINARY_SLOT, BINARY_OPTIONS, "binary", boundaries)
        text_rep.close()
        binary_rep.close()

        conn.execute(b"SELECT pg_replication_origin_drop(%s)", [ORIGIN])
        conn.execute(b"DROP PUBLICATION cdc_capture; DROP SCHEMA cdc_capture CASCADE")

    doc = {
        "comment": "Captured by tests/protocol/capture_payloads.py; hex of whole CopyData "
                   "frames ('w' XLogData with its 25-byte header, or 'k' keepalive).",
        "server_version": version[0],
        "captured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "start_replication": {"text": OPTIONS, "binary": BINARY_OPTIONS},
        "steps": {s.name: {"note": s.note, "sql": s.sql} for s in STEPS},
        "standby_status": status,
        "frames": frames,
    }
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(frames)} frames to {OUT}")


def _replication(dsn: str, slot: str) -> psycopg.Connection[tuple[object, ...]]:
    rep = psycopg.connect(dsn, replication="database", autocommit=True)
    rep.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput".encode())
    return rep


def _stream(
    rep: psycopg.Connection[tuple[object, ...]],
    slot: str,
    options: str,
    session: str,
    boundaries: list[tuple[str, Lsn]],
) -> list[dict[str, str]]:
    """Stream `slot` up to the end marker, then until a keepalive that requests a reply."""
    pgconn = rep.pgconn
    pgconn.send_query(f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({options})".encode())
    result = pgconn.get_result()
    if result is None or result.status != pq.ExecStatus.COPY_BOTH:
        raise RuntimeError(f"START_REPLICATION failed: {pgconn.error_message!r}")

    out: list[dict[str, str]] = []
    step = "?"
    seen_end = False

    def keep(frame: bytes) -> bool:
        nonlocal step, seen_end
        decoded = decode_copy_data(frame)
        if isinstance(decoded, PrimaryKeepalive):
            out.append({"session": session, "step": "keepalive", "hex": frame.hex(),
                        "note": f"k keepalive reply_requested={decoded.reply_requested}"})
            return seen_end and decoded.reply_requested
        msg = decode_message(decoded.data)
        if isinstance(msg, Begin):
            step = _step_of(msg.final_lsn, boundaries)
        elif isinstance(msg, Message) and not msg.transactional:
            step = _step_of(msg.lsn, boundaries)
            seen_end = msg.content == END_MARKER
        out.append({"session": session, "step": step, "hex": frame.hex(),
                    "note": f"w {chr(decoded.data[0])} {type(msg).__name__}"})
        return False

    _read(pgconn, keep)
    return out


def _confirm(
    rep: psycopg.Connection[tuple[object, ...]],
    conn: psycopg.Connection[tuple[object, ...]],
    frames: list[dict[str, str]],
) -> dict[str, str]:
    """Send a standby status for the last Commit's end LSN; record what the server confirms."""
    end = Lsn(0)
    for f in frames:
        decoded = decode_copy_data(bytes.fromhex(f["hex"]))
        if isinstance(decoded, XLogData):
            msg = decode_message(decoded.data)
            if isinstance(msg, Commit):
                end = msg.end_lsn
    now = datetime_to_pg_timestamp(datetime.now(UTC))
    status = encode_standby_status(end, end, end, now, reply=True)
    pgconn = rep.pgconn
    pgconn.put_copy_data(status)
    pgconn.flush()
    # The server answers a reply request with a keepalive once it has processed the status.
    _read(pgconn, lambda frame: frame[:1] == b"k")
    row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                       "WHERE slot_name = %s", [TEXT_SLOT]).fetchone()
    assert row is not None
    return {"sent_hex": status.hex(), "flush": str(end), "confirmed_flush_lsn": str(row[0])}


def _read(pgconn: PGconn, stop: Callable[[bytes], bool]) -> None:
    deadline = time.monotonic() + KEEPALIVE_WAIT
    while True:
        n, data = pgconn.get_copy_data(1)
        if n > 0:
            if stop(bytes(data)):
                return
            continue
        if n < 0:
            raise RuntimeError(f"replication stream ended: {pgconn.error_message!r}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no end of capture; is wal_sender_timeout short enough?")
        select.select([pgconn.socket], [], [], remaining)
        pgconn.consume_input()


def _step_of(lsn: Lsn, boundaries: list[tuple[str, Lsn]]) -> str:
    for name, boundary in boundaries:
        if lsn <= boundary:
            return name
    return "?"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DSN")
    main(sys.argv[1])

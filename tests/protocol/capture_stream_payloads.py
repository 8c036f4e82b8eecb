"""Capture pgoutput protocol-2 streaming (in-progress transactions) from PostgreSQL 15 into
`tests/protocol/captured_stream.json`.

Run by hand, not by pytest (`test_stream_decode.py` and `tests/test_changes_stream.py` read the
JSON it writes); as root or as any user, it starts its own throwaway cluster::

    .venv/bin/python tests/protocol/capture_stream_payloads.py

(or pass a DSN of an existing PostgreSQL 15 superuser connection with `wal_level = logical` as
the only argument). What it does:

- creates schema `cdc_stream` with tables `items (id int PRIMARY KEY, label text)` and
  `aux (id int PRIMARY KEY)` (REPLICA IDENTITY DEFAULT) and publication `cdc_stream`;
- opens a replication connection with `options='-c logical_decoding_work_mem=64kB'` (the
  smallest value: the walsender streams a transaction once its decoded changes pass 64 kB) and
  creates a temporary pgoutput slot there;
- runs these steps, each transaction on its own connection:

  A  a large transaction that commits: 1500 inserts; SAVEPOINT s1, 800 inserts, ROLLBACK TO s1
     RELEASE s1 (a subtransaction streamed and then rolled back: Stream Abort with
     subxid != xid);
     SAVEPOINT s2, 5 inserts, RELEASE s2 (changes carrying a subxid that commit); a
     transactional logical message; then, after B committed, 500 more inserts, an update of
     the primary key (old key 'K'), a delete, TRUNCATE aux; COMMIT (Stream Commit);
  B  a small ordinary transaction committed while A is open (Begin ... Commit between A's
     stream blocks: interleaving);
  C  a large transaction that rolls back: 1500 inserts, ROLLBACK (Stream Abort, subxid == xid);
  D  a large update of 1000 rows that commits (a second Stream Commit);
  end  a non-transactional message 'end' that stops the capture.

- streams the slot with `START_REPLICATION SLOT … LOGICAL 0/0 (proto_version '2',
  publication_names 'cdc_stream', streaming 'on', messages 'true')` up to the end marker.

It keeps a compact subset of the pgoutput payloads (the XLogData data, hex; not the frame
headers): every message that is not a row change, every row change outside stream blocks and
every Update/Delete, and of the Inserts of each stream block the first and last `KEEP_ROWS`.
Every kept message has `step` (A/B/C/D/end, by the top-level xid), `block` (the number of the
stream block it is in, counting from 0, or null outside blocks), `seq` (its index in the full
stream, so gaps show where rows were left out) and a note. `xids` records the xids the SQL
sessions saw (top-level and the two subtransactions of A, the latter read from the `xmin` of
rows they inserted). Everything it created goes with the cluster (or is dropped again).
"""

from __future__ import annotations

import json
import select
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cdc_sync.embedded import Cluster, find_server_binaries
from cdc_sync.protocol import (
    Begin,
    Commit,
    Message,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    XLogData,
    decode_copy_data,
    decode_message,
    decode_streamed,
)

OUT = Path(__file__).with_name("captured_stream.json")
SCHEMA = "cdc_stream"
SLOT = "cdc_stream_slot"
WORK_MEM = "64kB"
OPTIONS = (f"proto_version '2', publication_names '{SCHEMA}', streaming 'on', "
           "messages 'true'")
END_MARKER = b"end"
KEEP_ROWS = 2
WAIT = 30.0

SETUP = """
DROP PUBLICATION IF EXISTS cdc_stream;
DROP SCHEMA IF EXISTS cdc_stream CASCADE;
CREATE SCHEMA cdc_stream;
CREATE TABLE cdc_stream.items (id int PRIMARY KEY, label text);
CREATE TABLE cdc_stream.aux (id int PRIMARY KEY);
INSERT INTO cdc_stream.aux VALUES (1), (2);
CREATE PUBLICATION cdc_stream FOR TABLES IN SCHEMA cdc_stream;
"""

STEPS = {
    "A": "large, committed: savepoint rolled back, savepoint released, transactional message, "
         "key-changing update, delete, truncate",
    "B": "small, ordinary, committed while A is open",
    "C": "large, rolled back",
    "D": "large update of 1000 rows, committed",
    "end": "non-transactional end marker",
}


INSERT_ROWS = (b"INSERT INTO cdc_stream.items SELECT g, 'row ' || g "
               b"FROM generate_series(%s::int, %s::int) AS g")


def _one(conn: psycopg.Connection[tuple[Any, ...]], query: bytes) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def main(dsn: str) -> None:
    with ExitStack() as stack:
        conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        version = conn.execute("SHOW server_version").fetchone()
        assert version is not None
        conn.execute(SETUP.encode())
        rep = stack.enter_context(psycopg.connect(
            dsn, replication="database", autocommit=True,
            options=f"-c logical_decoding_work_mem={WORK_MEM}"))
        rep.execute(f"CREATE_REPLICATION_SLOT {SLOT} TEMPORARY LOGICAL pgoutput".encode())
        a = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        b = stack.enter_context(psycopg.connect(dsn, autocommit=True))

        xids: dict[str, int] = {}
        a.execute(b"BEGIN")
        a.execute(INSERT_ROWS, [1, 1500])
        xids["A"] = _one(a, b"SELECT pg_current_xact_id()::xid::text::bigint")
        a.execute(b"SAVEPOINT s1")
        a.execute(INSERT_ROWS, [100001, 100800])
        xids["A_rolled_back_sub"] = _one(
            a, b"SELECT xmin::text::bigint FROM cdc_stream.items WHERE id = 100001")
        a.execute(b"ROLLBACK TO SAVEPOINT s1")
        a.execute(b"RELEASE SAVEPOINT s1")
        a.execute(b"SAVEPOINT s2")
        a.execute(INSERT_ROWS, [200001, 200005])
        xids["A_released_sub"] = _one(
            a, b"SELECT xmin::text::bigint FROM cdc_stream.items WHERE id = 200001")
        a.execute(b"RELEASE SAVEPOINT s2")
        a.execute(b"SELECT pg_logical_emit_message(true, 'cdc_stream', 'inside A')")

        b.execute(b"BEGIN")
        b.execute(b"INSERT INTO cdc_stream.items VALUES (300001, 'from B')")
        xids["B"] = _one(b, b"SELECT pg_current_xact_id()::xid::text::bigint")
        b.execute(b"COMMIT")

        a.execute(INSERT_ROWS, [1501, 2000])
        a.execute(b"UPDATE cdc_stream.items SET id = 900001 WHERE id = 1")
        a.execute(b"DELETE FROM cdc_stream.items WHERE id = 2")
        a.execute(b"TRUNCATE cdc_stream.aux")
        a.execute(b"COMMIT")

        conn.execute(b"BEGIN")
        conn.execute(INSERT_ROWS, [400001, 401500])
        xids["C"] = _one(conn, b"SELECT pg_current_xact_id()::xid::text::bigint")
        conn.execute(b"ROLLBACK")

        conn.execute(b"BEGIN")
        conn.execute(b"UPDATE cdc_stream.items SET label = label || '!' "
                     b"WHERE id BETWEEN 3 AND 1002")
        xids["D"] = _one(conn, b"SELECT pg_current_xact_id()::xid::text::bigint")
        conn.execute(b"COMMIT")
        conn.execute(b"SELECT pg_logical_emit_message(false, 'cdc_stream', 'end')")

        everything = _stream(rep.pgconn)
        rep.close()
        conn.execute(b"DROP PUBLICATION cdc_stream; DROP SCHEMA cdc_stream CASCADE")

    messages = _label(everything, xids)
    kept = _compact(messages)
    doc = {
        "comment": "Captured by tests/protocol/capture_stream_payloads.py; hex of pgoutput "
                   "payloads (XLogData data), a compact subset of the stream (see 'seq').",
        "server_version": version[0],
        "captured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "start_replication": OPTIONS,
        "logical_decoding_work_mem": WORK_MEM,
        "steps": STEPS,
        "xids": xids,
        "total_messages": len(messages),
        "messages": kept,
    }
    OUT.write_text(json.dumps(doc, indent=0, ensure_ascii=False) + "\n")
    blocks = sum(1 for m in messages if m["note"].startswith("S "))
    print(f"{len(messages)} messages in {blocks} stream blocks; kept {len(kept)}; "
          f"wrote {OUT} ({OUT.stat().st_size} bytes)")


def _stream(pgconn: pq.abc.PGconn) -> list[bytes]:
    """Every pgoutput payload from the start of the slot up to the end marker."""
    pgconn.send_query(f"START_REPLICATION SLOT {SLOT} LOGICAL 0/0 ({OPTIONS})".encode())
    result = pgconn.get_result()
    if result is None or result.status != pq.ExecStatus.COPY_BOTH:
        raise RuntimeError(f"START_REPLICATION failed: {pgconn.error_message!r}")
    out: list[bytes] = []
    in_block = False
    deadline = time.monotonic() + WAIT
    while True:
        n, data = pgconn.get_copy_data(1)
        if n > 0:
            decoded = decode_copy_data(bytes(data))
            if not isinstance(decoded, XLogData):
                continue
            payload = bytes(decoded.data)
            out.append(payload)
            msg = decode_streamed(payload)[1] if in_block else decode_message(payload)
            if isinstance(msg, StreamStart):
                in_block = True
            elif isinstance(msg, StreamStop):
                in_block = False
            elif isinstance(msg, Message) and not msg.transactional and \
                    msg.content == END_MARKER:
                return out
            continue
        if n < 0:
            raise RuntimeError(f"replication stream ended: {pgconn.error_message!r}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no end marker in the stream")
        select.select([pgconn.socket], [], [], remaining)
        pgconn.consume_input()


def _label(payloads: list[bytes], xids: dict[str, int]) -> list[dict[str, Any]]:
    """Each payload with its step (by top-level xid), stream block number and a note."""
    step_of = {xid: name for name, xid in xids.items() if "_" not in name}
    out: list[dict[str, Any]] = []
    block: int | None = None
    blocks = 0
    block_xid: int | None = None  # the transaction of the open stream block
    begin_xid: int | None = None  # the transaction of the open Begin
    for seq, payload in enumerate(payloads):
        if block is not None:
            xid, msg = decode_streamed(payload)
        else:
            xid, msg = None, decode_message(payload)
        if isinstance(msg, StreamStart):
            block, block_xid = blocks, msg.xid
            blocks += 1
        elif isinstance(msg, Begin):
            begin_xid = msg.xid
        if block is not None:
            owner = block_xid
        elif isinstance(msg, (StreamCommit, StreamAbort)):
            owner = msg.xid
        else:
            owner = begin_xid
        step = step_of.get(owner, "?") if owner is not None else "end"
        note = f"{chr(payload[0])} {type(msg).__name__}"
        if xid is not None:
            note += f" xid={xid}"
        out.append({"seq": seq, "step": step, "block": block, "note": note,
                    "hex": payload.hex()})
        if isinstance(msg, StreamStop):
            block = None
        elif isinstance(msg, Commit):
            begin_xid = None
    return out


def _compact(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every message but the Inserts inside stream blocks, of which the first and last few."""
    inserts: dict[int, list[int]] = {}
    for i, m in enumerate(messages):
        if m["block"] is not None and m["hex"][:2] == b"I".hex():
            inserts.setdefault(m["block"], []).append(i)
    dropped: set[int] = set()
    for indexes in inserts.values():
        dropped.update(indexes[KEEP_ROWS:-KEEP_ROWS])
    # Updates are many in D: keep their first and last few per block as well.
    updates: dict[int, list[int]] = {}
    for i, m in enumerate(messages):
        if m["block"] is not None and m["hex"][:2] == b"U".hex() and m["step"] == "D":
            updates.setdefault(m["block"], []).append(i)
    for indexes in updates.values():
        dropped.update(indexes[KEEP_ROWS:-KEEP_ROWS])
    return [m for i, m in enumerate(messages) if i not in dropped]


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit(f"usage: {sys.argv[0]} [DSN]")
    if len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        pg15 = [b for b in find_server_binaries() if b.major == 15]
        if not pg15:
            sys.exit("PostgreSQL 15 not found (install postgresql-15)")
        with Cluster.create(binaries=pg15[0]) as cluster:
            main(cluster.dsn())

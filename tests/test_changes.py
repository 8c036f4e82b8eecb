"""Assembler: captured pgoutput messages in, TxBegin / TxChanges / TxCommit items out."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdc_sync.changes import (
    Assembler,
    Change,
    Op,
    Transaction,
    TxBegin,
    TxChanges,
    TxCommit,
    TxItem,
    collect_transactions,
)
from cdc_sync.protocol import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Insert,
    Lsn,
    Message,
    PgOutputMessage,
    ProtocolError,
    Relation,
    ReplicaIdentity,
    XLogData,
    decode_copy_data,
    decode_message,
    pg_timestamp_to_datetime,
)

# The frames captured by tests/protocol/capture_payloads.py (see tests/protocol/payloads.py).
_CAPTURE = json.loads((Path(__file__).parent / "protocol" / "captured.json").read_text())
SCHEMA = "cdc_capture"


def stream(session: str = "text") -> list[tuple[str, PgOutputMessage]]:
    """(step, message) for every pgoutput message of a captured session, in stream order."""
    out = []
    for frame in _CAPTURE["frames"]:
        if frame["session"] != session:
            continue
        decoded = decode_copy_data(bytes.fromhex(frame["hex"]))
        if isinstance(decoded, XLogData):
            out.append((frame["step"], decode_message(decoded.data)))
    return out


def assemble(messages: list[PgOutputMessage], chunk_size: int = 5000) -> list[TxItem]:
    assembler = Assembler(chunk_size=chunk_size)
    items: list[TxItem] = []
    for msg in messages:
        items.extend(assembler.feed(msg))
    assert not assembler.in_transaction
    return items


def transactions(session: str = "text", chunk_size: int = 5000) -> dict[str, Transaction]:
    """Whole transactions of the capture, by step name (every step is one transaction)."""
    pairs = stream(session)
    txs = collect_transactions(assemble([m for _, m in pairs], chunk_size))
    steps = list(dict.fromkeys(step for step, _ in pairs))
    assert len(txs) == len(steps)
    return dict(zip(steps, txs, strict=True))


def ops(tx: Transaction) -> list[Op]:
    return [c.op for c in tx.changes]


def test_every_step_becomes_one_transaction_in_order() -> None:
    txs = transactions()
    assert list(txs) == list(_CAPTURE["steps"])
    for tx in txs.values():
        assert [c.position for c in tx.changes] == list(range(len(tx.changes)))
        assert tx.begin.commit_lsn == tx.commit.commit_lsn
        assert tx.begin.commit_ts == tx.commit.commit_ts
        assert tx.commit.end_lsn >= tx.commit.commit_lsn


def test_rows_and_tables() -> None:
    txs = transactions()
    tx = txs["insert_items"]
    assert ops(tx) == [Op.INSERT, Op.INSERT]
    table = tx.changes[0].table
    assert table is not None
    assert table.qualified == f"{SCHEMA}.items"
    assert table.columns == ("id", "name", "mood", "code", "amount", "note", "big")
    assert table.key_columns == ("id",)
    assert table.replica_identity is ReplicaIdentity.DEFAULT
    assert tx.changes[1].new == ("2", "beta", "sad", "B-2", "-3.25", "grüße ✓", "small")
    assert tx.begin.origin is None
    assert tx.begin.commit_ts.tzinfo is not None

    update = txs["update_toast"].changes[0]
    assert update.op is Op.UPDATE and update.old is None and not update.old_is_key
    assert update.new is not None and update.new[-1] is UNCHANGED_TOAST

    key_update = txs["update_key"].changes[0]
    assert key_update.old_is_key and key_update.old is not None and key_update.old[0] == "2"
    assert key_update.new is not None and key_update.new[0] == "10"

    delete = txs["delete_key"].changes[0]
    assert delete.op is Op.DELETE and delete.old_is_key and delete.new is None


def test_replica_identity_full() -> None:
    tx = transactions()["ledger_full"]
    assert ops(tx) == [Op.INSERT, Op.UPDATE, Op.DELETE]
    update, delete = tx.changes[1], tx.changes[2]
    assert not update.old_is_key and update.old == ("1", "open", "100.5")
    assert not delete.old_is_key and delete.old == ("1", "open", "99")
    assert update.table is not None
    assert update.table.replica_identity is ReplicaIdentity.FULL


def test_messages() -> None:
    txs = transactions()
    tx = txs["message_tx"]
    assert ops(tx) == [Op.INSERT, Op.MESSAGE, Op.INSERT]
    msg = tx.changes[1]
    assert (msg.prefix, msg.content, msg.position, msg.table) == (
        "cdc_capture", b"transactional content", 1, None,
    )

    # A non-transactional message is a one-change pseudo transaction at its own LSN.
    nontx = txs["message_nontx"]
    assert ops(nontx) == [Op.MESSAGE]
    assert nontx.changes[0].content == b"\x00\xff\x10"
    assert nontx.begin.xid == 0
    assert nontx.begin.commit_lsn == nontx.commit.commit_lsn == nontx.commit.end_lsn > 0


def test_truncate() -> None:
    txs = transactions()
    cascade = txs["truncate_cascade"].changes
    assert [c.op for c in cascade] == [Op.TRUNCATE]
    assert [t.name for t in cascade[0].truncated] == ["parent", "child"]
    assert cascade[0].truncate_options == 3
    plain = txs["truncate_plain"].changes[0]
    assert [t.name for t in plain.truncated] == ["ledger"] and plain.truncate_options == 0


def test_origin_and_its_commit_time() -> None:
    tx = transactions()["origin"]
    assert tx.begin.origin == "cdc_capture_o1"
    assert tx.begin.commit_ts == datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert tx.commit.commit_ts == tx.begin.commit_ts
    assert ops(tx) == [Op.INSERT]
    # The origin does not leak into the next transaction.
    assert transactions()["many_rows"].begin.origin is None


def test_binary_session_values_are_bytes() -> None:
    tx = transactions("binary")["binary"]
    assert ops(tx) == [Op.INSERT, Op.UPDATE]
    assert tx.changes[0].new is not None and tx.changes[0].new[6] == b"\xde\xad\xbe\xef"


def _items_of(step: str, chunk_size: int) -> list[TxItem]:
    """The items of one captured step, after the Relation of `items` it relies on."""
    relation = next(m for _, m in stream() if isinstance(m, Relation) and m.name == "items")
    return assemble([relation, *(m for s, m in stream() if s == step)], chunk_size)


def test_chunking_a_transaction_bigger_than_chunk_size() -> None:
    items = _items_of("many_rows", chunk_size=3)
    assert [type(i).__name__ for i in items] == [
        "TxBegin", "TxChanges", "TxChanges", "TxChanges", "TxCommit",
    ]
    chunks = [i for i in items if isinstance(i, TxChanges)]
    assert [len(c.changes) for c in chunks] == [3, 3, 1]
    changes = [c for chunk in chunks for c in chunk.changes]
    assert [c.position for c in changes] == list(range(7))
    assert [c.new[0] if c.new else None for c in changes] == [str(i) for i in range(100, 107)]
    whole = collect_transactions(_items_of("many_rows", chunk_size=5000))
    assert collect_transactions(items) == whole


def test_chunk_exactly_full_leaves_no_empty_chunk() -> None:
    items = _items_of("many_rows", chunk_size=7)
    assert [type(i).__name__ for i in items] == ["TxBegin", "TxChanges", "TxCommit"]
    items = _items_of("many_rows", chunk_size=1)
    assert [len(i.changes) for i in items if isinstance(i, TxChanges)] == [1] * 7


def test_items_are_emitted_as_the_stream_goes() -> None:
    messages = [m for s, m in stream() if s == "many_rows"]
    assembler = Assembler(chunk_size=3)
    assert assembler.feed(messages[0]) == []  # Begin alone emits nothing yet
    assert assembler.in_transaction
    assert assembler.feed(ITEMS) == []  # a Relation is taken inside a transaction too
    first = assembler.feed(messages[1])
    assert [type(i) for i in first] == [TxBegin]
    assert assembler.feed(messages[2]) == []
    third = assembler.feed(messages[3])
    assert [type(i) for i in third] == [TxChanges]
    assert isinstance(assembler.feed(messages[-1])[-1], TxCommit)
    assert not assembler.in_transaction


# --- messages out of order -----------------------------------------------------------------

BEGIN = Begin(Lsn(0x100), 0, 7)
COMMIT = Commit(0, Lsn(0x100), Lsn(0x128), 0)
ITEMS = next(m for _, m in stream() if isinstance(m, Relation) and m.name == "items")
ROW = Insert(ITEMS.oid, ("1", None, None, None, None, None, None))


@pytest.mark.parametrize(
    "msg",
    [ROW, COMMIT, Message(1, Lsn(0x90), "p", b"x")],
    ids=["insert", "commit", "transactional-message"],
)
def test_change_outside_a_transaction(msg: PgOutputMessage) -> None:
    assembler = Assembler()
    assembler.feed(ITEMS)
    with pytest.raises(ProtocolError, match="outside a transaction"):
        assembler.feed(msg)


def test_nested_begin() -> None:
    assembler = Assembler()
    assembler.feed(BEGIN)
    with pytest.raises(ProtocolError, match="Begin inside an open transaction"):
        assembler.feed(BEGIN)


def test_change_before_its_relation() -> None:
    assembler = Assembler()
    assembler.feed(BEGIN)
    with pytest.raises(ProtocolError, match="before its Relation"):
        assembler.feed(ROW)


def test_reset_forgets_the_open_transaction_and_relations() -> None:
    assembler = Assembler()
    assembler.feed(ITEMS)
    assembler.feed(BEGIN)
    assembler.feed(ROW)
    assembler.reset()
    assert not assembler.in_transaction and not assembler.tables
    with pytest.raises(ProtocolError):
        assembler.feed(ROW)
    assembler.feed(ITEMS)
    items = [*assembler.feed(BEGIN), *assembler.feed(ROW), *assembler.feed(COMMIT)]
    (tx,) = collect_transactions(items)
    assert tx.begin == TxBegin(7, Lsn(0x100), pg_timestamp_to_datetime(0), None)
    assert tx.changes == (Change(Op.INSERT, 0, assembler.tables[ITEMS.oid], new=ROW.new),)
    assert tx.commit == TxCommit(Lsn(0x100), Lsn(0x128), pg_timestamp_to_datetime(0))


def test_a_relation_sent_again_unchanged_keeps_its_table() -> None:
    # The sites cache their description of a table by its Table object; the bus repeats the
    # Relation in every message, and a new object each time made every transaction describe
    # the site's table again (a catalog round trip per transaction).
    assembler = Assembler()
    assembler.feed(ITEMS)
    table = assembler.tables[ITEMS.oid]
    assembler.feed(dataclasses.replace(ITEMS))
    assert assembler.tables[ITEMS.oid] is table
    renamed = dataclasses.replace(ITEMS, name="items2")
    assembler.feed(renamed)
    assert assembler.tables[ITEMS.oid] is not table
    assert assembler.tables[ITEMS.oid].name == "items2"

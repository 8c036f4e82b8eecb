"""decode_message on pgoutput messages captured from PostgreSQL 15, and on broken ones."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from cdc_sync.protocol import (
    TRUNCATE_CASCADE,
    TRUNCATE_RESTART_IDENTITY,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    Lsn,
    Message,
    OldTupleKind,
    Origin,
    PgOutputMessage,
    ProtocolError,
    Relation,
    ReplicaIdentity,
    Truncate,
    Type,
    Update,
    _decode,
    datetime_to_pg_timestamp,
    decode_message,
)

from .payloads import BIG_VALUE, ORIGIN_NAME, SCHEMA, STEPS, payloads

INT4, TEXT, VARCHAR, NUMERIC, BOOL, TIMESTAMPTZ, BYTEA = 23, 25, 1043, 1700, 16, 1184, 17
VARCHAR_12 = 12 + 4  # atttypmod of varchar(12): length + VARHDRSZ
NUMERIC_10_2 = ((10 << 16) | 2) + 4  # atttypmod of numeric(10, 2)


def decoded(step: str, session: str = "text") -> list[PgOutputMessage]:
    return [decode_message(p) for p in payloads(session, step)]


def kinds(messages: list[PgOutputMessage]) -> list[str]:
    return [type(m).__name__ for m in messages]


def assert_begin_commit(begin: PgOutputMessage, commit: PgOutputMessage) -> None:
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert commit.flags == 0
    assert commit.commit_lsn == begin.final_lsn
    assert commit.end_lsn > commit.commit_lsn
    assert commit.commit_ts == begin.commit_ts
    assert isinstance(commit.end_lsn, Lsn) and isinstance(begin.final_lsn, Lsn)
    assert begin.xid > 0


# --- every message type and tuple kind, with the values the capture script wrote -------------


def test_capture_covers_every_step() -> None:
    for step in STEPS:
        assert payloads("text", step), step
    assert payloads("binary", "binary")


def test_insert_with_type_relation_null_toast_and_utf8() -> None:
    msgs = decoded("insert_items")
    assert kinds(msgs) == ["Begin", "Type", "Relation", "Insert", "Insert", "Commit"]
    begin, typ, rel, ins1, ins2, commit = msgs
    assert_begin_commit(begin, commit)

    assert isinstance(typ, Type)
    assert (typ.namespace, typ.name) == (SCHEMA, "mood")

    assert isinstance(rel, Relation)
    assert (rel.namespace, rel.name) == (SCHEMA, "items")
    assert rel.replica_identity is ReplicaIdentity.DEFAULT
    assert [c.name for c in rel.columns] == ["id", "name", "mood", "code", "amount", "note", "big"]
    assert [c.is_key for c in rel.columns] == [True] + [False] * 6
    assert [c.flags for c in rel.columns] == [1, 0, 0, 0, 0, 0, 0]
    assert [c.type_oid for c in rel.columns] == [INT4, TEXT, typ.oid, VARCHAR, NUMERIC, TEXT, TEXT]
    assert [c.type_modifier for c in rel.columns] == [-1, -1, -1, VARCHAR_12, NUMERIC_10_2, -1, -1]

    assert isinstance(ins1, Insert) and isinstance(ins2, Insert)
    assert ins1.relation_oid == ins2.relation_oid == rel.oid
    assert ins1.new == ("1", "alpha", "happy", "A-1", "12.50", None, BIG_VALUE)
    assert len(BIG_VALUE) == 3200
    assert ins2.new == ("2", "beta", "sad", "B-2", "-3.25", "grüße ✓", "small")


def test_update_leaving_toast_unchanged() -> None:
    msgs = decoded("update_toast")
    assert kinds(msgs) == ["Begin", "Update", "Commit"]
    upd = msgs[1]
    assert isinstance(upd, Update)
    assert upd.old_kind is None and upd.old is None
    assert upd.new == ("1", "alpha2", "happy", "A-1", "13.00", None, UNCHANGED_TOAST)
    assert upd.new[-1] is UNCHANGED_TOAST
    assert_begin_commit(msgs[0], msgs[2])


def test_update_of_the_key_sends_old_key() -> None:
    msgs = decoded("update_key")
    assert kinds(msgs) == ["Begin", "Update", "Commit"]
    upd = msgs[1]
    assert isinstance(upd, Update)
    assert upd.old_kind is OldTupleKind.KEY
    assert upd.old == ("2", None, None, None, None, None, None)
    assert upd.new == ("10", "beta", "sad", "B-2", "-3.25", "grüße ✓", "small")


def test_delete_with_default_identity_sends_old_key() -> None:
    msgs = decoded("delete_key")
    assert kinds(msgs) == ["Begin", "Delete", "Commit"]
    delete = msgs[1]
    assert isinstance(delete, Delete)
    assert delete.old_kind is OldTupleKind.KEY
    assert delete.old == ("10", None, None, None, None, None, None)


def test_replica_identity_full_sends_old_rows() -> None:
    msgs = decoded("ledger_full")
    assert kinds(msgs) == ["Begin", "Relation", "Insert", "Update", "Delete", "Commit"]
    _, rel, ins, upd, delete, _ = msgs
    assert isinstance(rel, Relation)
    assert rel.replica_identity is ReplicaIdentity.FULL
    assert all(c.is_key for c in rel.columns)  # FULL flags every column
    assert [c.type_modifier for c in rel.columns] == [-1, -1, -1]
    assert isinstance(ins, Insert) and ins.new == ("1", "open", "100.5")
    assert isinstance(upd, Update)
    assert upd.old_kind is OldTupleKind.OLD
    assert upd.old == ("1", "open", "100.5")
    assert upd.new == ("1", "open", "99")
    assert isinstance(delete, Delete)
    assert delete.old_kind is OldTupleKind.OLD and delete.old == ("1", "open", "99")
    assert ins.relation_oid == upd.relation_oid == delete.relation_oid == rel.oid


def test_transactional_message_in_row_order() -> None:
    msgs = decoded("message_tx")
    assert kinds(msgs) == ["Begin", "Insert", "Message", "Insert", "Commit"]
    begin, ins, msg, _, _ = msgs
    assert isinstance(msg, Message) and isinstance(begin, Begin) and isinstance(ins, Insert)
    assert msg.flags == 1 and msg.transactional
    assert msg.prefix == "cdc_capture"
    assert msg.content == b"transactional content"
    assert isinstance(msg.lsn, Lsn) and 0 < msg.lsn < begin.final_lsn
    assert ins.new == ("2", "before", None)


def test_non_transactional_message_stands_alone() -> None:
    msgs = decoded("message_nontx")
    assert kinds(msgs) == ["Message"]
    msg = msgs[0]
    assert isinstance(msg, Message)
    assert msg.flags == 0 and not msg.transactional
    assert msg.content == b"\x00\xff\x10"  # bytea content, not text


def test_truncate_cascade_restart_identity() -> None:
    inserted = decoded("parent_child")
    rel_oids = {m.name: m.oid for m in inserted if isinstance(m, Relation)}
    msgs = decoded("truncate_cascade")
    assert kinds(msgs) == ["Begin", "Relation", "Relation", "Truncate", "Commit"]
    trunc = msgs[3]
    assert isinstance(trunc, Truncate)
    assert trunc.options == TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY == 3
    assert trunc.relation_oids == (rel_oids["parent"], rel_oids["child"])


def test_truncate_plain() -> None:
    msgs = decoded("truncate_plain")
    assert kinds(msgs) == ["Begin", "Relation", "Truncate", "Commit"]
    rel, trunc = msgs[1], msgs[2]
    assert isinstance(rel, Relation) and isinstance(trunc, Truncate)
    assert trunc.options == 0 and trunc.relation_oids == (rel.oid,)


def test_origin_follows_begin_and_sets_commit_time() -> None:
    msgs = decoded("origin")
    assert kinds(msgs) == ["Begin", "Origin", "Insert", "Commit"]
    begin, origin, ins, commit = msgs
    assert isinstance(origin, Origin)
    assert origin.name == ORIGIN_NAME
    assert origin.origin_lsn == Lsn.parse("0/12345678")
    # pg_replication_origin_xact_setup's timestamp becomes the decoded commit time.
    expected = datetime_to_pg_timestamp(datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert isinstance(begin, Begin) and begin.commit_ts == expected
    assert_begin_commit(begin, commit)
    assert isinstance(ins, Insert) and ins.new[1] == "from-origin"


def test_many_rows() -> None:
    msgs = decoded("many_rows")
    assert kinds(msgs) == ["Begin"] + ["Insert"] * 7 + ["Commit"]
    ids = [m.new[0] for m in msgs if isinstance(m, Insert)]
    assert ids == [str(i) for i in range(100, 107)]


def test_binary_tuple_kind() -> None:
    msgs = decoded("binary", "binary")
    assert kinds(msgs) == [
        "Begin", "Type", "Relation", "Insert", "Type", "Relation", "Update", "Commit",
    ]
    rel, ins, upd = msgs[2], msgs[3], msgs[6]
    assert isinstance(rel, Relation) and isinstance(ins, Insert) and isinstance(upd, Update)
    assert [c.type_oid for c in rel.columns][:1] + [c.type_oid for c in rel.columns][3:] == [
        INT4, NUMERIC, BOOL, TIMESTAMPTZ, BYTEA, TEXT,
    ]
    id_, label, mood, amount, flag, at, data, missing = ins.new
    assert id_ == struct.pack("!i", 1)
    assert (label, mood) == (b"bin", b"ok")  # text and enum send their text bytes
    # numeric_send of 1.50: ndigits 2, weight 0, sign +, dscale 2, base-10000 digits 1, 5000
    assert amount == struct.pack("!hhhhhh", 2, 0, 0, 2, 1, 5000)
    assert flag == b"\x01"
    ts = datetime_to_pg_timestamp(datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC))
    assert at == struct.pack("!q", ts)
    assert data == b"\xde\xad\xbe\xef"
    assert missing is None
    assert upd.new[5] == b"bin-update" and upd.new[6] is UNCHANGED_TOAST

    # The same transaction in the text session: 't' everywhere.
    text = decoded("binary", "text")
    text_insert = text[3]
    assert isinstance(text_insert, Insert)
    assert text_insert.new == (
        "1", "bin", "ok", "1.50", "t", "2024-02-03 04:05:06+00", "\\xdeadbeef", None,
    )


def test_every_captured_payload_decodes_and_memoryview_matches() -> None:
    for session in ("text", "binary"):
        for payload in payloads(session):
            message = decode_message(payload)
            assert decode_message(memoryview(payload)) == message


# --- malformed input: always ProtocolError, with an offset ----------------------------------


def _all_payloads() -> list[bytes]:
    return payloads("text") + payloads("binary")


def test_every_truncation_of_every_payload_raises() -> None:
    checked = 0
    for payload in _all_payloads():
        for cut in range(len(payload)):
            with pytest.raises(ProtocolError) as info:
                decode_message(payload[:cut])
            assert 0 <= info.value.offset <= cut, (payload[:1], cut, info.value)
            checked += 1
    assert checked > 5_000  # every prefix of ~70 real messages


def test_trailing_byte_raises_at_the_end() -> None:
    for payload in _all_payloads():
        with pytest.raises(ProtocolError, match="trailing") as info:
            decode_message(payload + b"\x00")
        assert info.value.offset == len(payload)


@pytest.mark.parametrize("tag", [b"Z", b"\x00", b"w", b"k"])
def test_unknown_tag(tag: bytes) -> None:
    with pytest.raises(ProtocolError, match="unknown pgoutput message tag") as info:
        decode_message(tag + bytes(30))
    assert info.value.offset == 0


@pytest.mark.parametrize("tag", [b"b", b"P", b"K", b"r", b"p"])
def test_two_phase_messages_are_refused(tag: bytes) -> None:
    with pytest.raises(ProtocolError, match="protocol version 3"):
        decode_message(tag + bytes(30))


def test_empty_message() -> None:
    with pytest.raises(ProtocolError, match="empty") as info:
        decode_message(b"")
    assert info.value.offset == 0


# Synthetic messages for bad bytes, built with the same layout the server uses.


def _text_tuple(*values: str | None) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        else:
            raw = v.encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def _insert(tuple_bytes: bytes, oid: int = 42, marker: bytes = b"N") -> bytes:
    return b"I" + struct.pack("!I", oid) + marker + tuple_bytes


def test_synthetic_insert_matches_layout() -> None:
    assert decode_message(_insert(_text_tuple("1", None, ""))) == Insert(42, ("1", None, ""))


@pytest.mark.parametrize(
    ("payload", "match", "offset"),
    [
        (_insert(b"\x00\x01x"), "unknown column kind b'x'", 8),
        (_insert(b"\x00\x01t\xff\xff\xff\xff"), "negative value length -1", 9),
        (_insert(b"\x00\x01b\x80\x00\x00\x00"), "negative value length", 9),
        (_insert(b"\x00\x01t\x00\x00\x00\x05abc"), "runs past the end", 9),
        (_insert(b"\x00\x01t\x00\x00"), "value length: needs 4", 9),
        (_insert(b"\x00\x02n"), "column kind: needs 1", 9),
        (_insert(b"\xff\xff"), "negative column count", 6),
        (_insert(b"\x00\x01t\x00\x00\x00\x02\xc3\x28"), "not valid UTF-8", 13),
        (_insert(_text_tuple("1"), marker=b"K"), "expected 'N'", 5),
        (b"U" + struct.pack("!I", 1) + b"X" + _text_tuple("1"), "expected 'K' or 'O'", 5),
        (b"U" + struct.pack("!I", 1) + b"K" + _text_tuple("1") + b"O" + _text_tuple("1"),
         "expected 'N'", 14),
        (b"D" + struct.pack("!I", 1) + b"N" + _text_tuple("1"), "expected 'K' or 'O'", 5),
        (b"T" + struct.pack("!iB", -1, 0), "negative relation count", 1),
        (b"T" + struct.pack("!iBI", 2, 0, 7), "relation oids: needs 8", 6),
        (b"M\x01" + bytes(8) + b"p\x00" + struct.pack("!i", -3), "negative content length", 12),
        (b"M\x01" + bytes(8) + b"p\x00" + struct.pack("!i", 3) + b"ab", "content: needs 3", 16),
        (b"M\x01" + bytes(8) + b"prefix", "no NUL terminator", 10),
        (b"O" + bytes(8) + b"\xff\x00", "Origin name: invalid UTF-8", 9),
        (b"R" + struct.pack("!I", 1) + b"s\x00t\x00x" + struct.pack("!h", 0),
         "unknown replica identity b'x'", 9),
        (b"R" + struct.pack("!I", 1) + b"s\x00t\x00d" + struct.pack("!h", -2),
         "negative column count", 10),
        (b"R" + struct.pack("!I", 1) + b"s\x00t\x00d" + struct.pack("!h", 1) + b"\x01id\x00",
         "column type: needs 8", 16),
        (b"Y" + struct.pack("!I", 1) + b"s\x00t", "Type name: no NUL", 7),
    ],
)
def test_malformed(payload: bytes, match: str, offset: int) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_message(payload)
    assert info.value.offset == offset
    assert f"offset {offset}" in str(info.value)


def test_pg_catalog_namespace_is_empty_string() -> None:
    rel = decode_message(
        b"R" + struct.pack("!I", 1259) + b"\x00pg_class\x00n" + struct.pack("!h", 0)
    )
    assert rel == Relation(1259, "", "pg_class", ReplicaIdentity.NOTHING, ())


def test_extreme_values() -> None:
    begin = decode_message(b"B" + struct.pack("!QqI", 2**64 - 1, -1, 2**32 - 1))
    assert begin == Begin(Lsn(2**64 - 1), -1, 2**32 - 1)
    rel = decode_message(
        b"R" + struct.pack("!I", 2**32 - 1) + b"s\x00t\x00i" + struct.pack("!h", 1)
        + b"\x01c\x00" + struct.pack("!Ii", 2**32 - 1, -1)
    )
    assert isinstance(rel, Relation) and rel.oid == 2**32 - 1
    assert rel.replica_identity is ReplicaIdentity.INDEX
    assert rel.columns[0].type_oid == 2**32 - 1 and rel.columns[0].type_modifier == -1
    assert decode_message(_insert(b"\x00\x00")) == Insert(42, ())
    assert decode_message(_insert(b"\x00\x02ub\x00\x00\x00\x00")) == Insert(
        42, (UNCHANGED_TOAST, b"")
    )


def test_fast_constructors_match_dataclasses() -> None:
    new = ("1", None, UNCHANGED_TOAST, b"x")
    made: list[tuple[Insert | Update | Delete, Insert | Update | Delete]] = [
        (_decode._new_insert(7, new), Insert(7, new)),
        (_decode._new_update(7, OldTupleKind.KEY, ("1",), new),
         Update(7, OldTupleKind.KEY, ("1",), new)),
        (_decode._new_update(7, None, None, new), Update(7, None, None, new)),
        (_decode._new_delete(7, OldTupleKind.OLD, new), Delete(7, OldTupleKind.OLD, new)),
    ]
    for fast, slow in made:
        assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
        with pytest.raises(AttributeError):
            fast.relation_oid = 8  # type: ignore[misc]

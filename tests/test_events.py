"""Events: typed JSON values, ids, row shapes, truncate, messages, heartbeats, outbox rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from cdc_sync.changes import UNCHANGED_TOAST, Change, Op, Table, TxBegin
from cdc_sync.events import (
    Event,
    change_to_event,
    converter_for,
    event_dicts,
    event_id,
    events_for_change,
    format_commit_ts,
    outbox_rows,
    parse_array,
    transaction_events,
)
from cdc_sync.protocol import Lsn, ReplicaIdentity

COMMIT_LSN = Lsn(0x1A2B3C4)
BEGIN = TxBegin(xid=7, commit_lsn=COMMIT_LSN,
                commit_ts=datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC), origin=None)

# name, type OID
COLUMNS: list[tuple[str, int]] = [
    ("id", 23), ("small", 21), ("big", 20), ("o", 26),
    ("r", 700), ("d", 701), ("n", 1700), ("b", 16),
    ("j", 114), ("jb", 3802), ("t", 25), ("ts", 1184), ("u", 2950),
    ("ints", 1007), ("texts", 1009), ("floats", 1022), ("nums", 1231), ("bools", 1000),
    ("jsons", 3807), ("dates", 1182), ("grid", 1007), ("boxes", 1020), ("mood", 99999),
]


def make_table(columns: list[tuple[str, int]] = COLUMNS, key: tuple[int, ...] = (0,),
               name: str = "grants", schema: str = "public") -> Table:
    return Table(
        oid=16384, schema=schema, name=name,
        columns=tuple(c for c, _ in columns), type_oids=tuple(t for _, t in columns),
        type_modifiers=tuple(-1 for _ in columns), key=key,
        replica_identity=ReplicaIdentity.DEFAULT,
    )


TABLE = make_table()

ROW_TEXT: dict[str, Any] = {
    "id": "7", "small": "-3", "big": "9223372036854775807", "o": "4294967295",
    "r": "1.5", "d": "-2.5e-310", "n": "1500.00", "b": "t",
    "j": '{"a": [1, 2.5, null], "b": "x"}', "jb": '{"k": {"deep": true}}',
    "t": "hello, \"world\"", "ts": "2026-11-28 12:00:00.123+00", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "ints": "{1,NULL,3}", "texts": '{"a b","c\\"d","NULL",NULL,"x\\\\y",plain}',
    "floats": "{NaN,1.5,-Infinity,Infinity}", "nums": "{1.10,NaN,NULL}", "bools": "{t,f,NULL}",
    "jsons": '{"{\\"a\\": 1}",NULL,"[1, 2]"}', "dates": "{2026-01-01,NULL}",
    "grid": "{{1,2},{3,NULL}}", "boxes": "{(1,1),(0,0);(2,2),(1,1)}", "mood": "happy",
}

ROW_JSON: dict[str, Any] = {
    "id": 7, "small": -3, "big": 9223372036854775807, "o": 4294967295,
    "r": 1.5, "d": -2.5e-310, "n": "1500.00", "b": True,
    "j": {"a": [1, 2.5, None], "b": "x"}, "jb": {"k": {"deep": True}},
    "t": "hello, \"world\"", "ts": "2026-11-28 12:00:00.123+00",
    "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "ints": [1, None, 3], "texts": ["a b", 'c"d', "NULL", None, "x\\y", "plain"],
    "floats": ["NaN", 1.5, "-Infinity", "Infinity"], "nums": ["1.10", "NaN", None],
    "bools": [True, False, None], "jsons": [{"a": 1}, None, [1, 2]],
    "dates": ["2026-01-01", None], "grid": [[1, 2], [3, None]],
    "boxes": ["(1,1),(0,0)", "(2,2),(1,1)"], "mood": "happy",
}


def values(row: dict[str, Any], table: Table = TABLE) -> tuple[Any, ...]:
    return tuple(row.get(c) for c in table.columns)


def one(change: Change, source: str = "washington") -> Event:
    event = change_to_event(source, BEGIN, change)
    assert event is not None
    return event


# -- ids and timestamps ------------------------------------------------------------------------

def test_event_id_format() -> None:
    assert event_id("washington", COMMIT_LSN, 3) == "washington/0/1A2B3C4/3"
    assert event_id("w", Lsn((5 << 32) | 0xA), 0) == "w/5/A/0"


def test_commit_ts_iso_with_micros_in_utc() -> None:
    assert format_commit_ts(BEGIN.commit_ts) == "2026-11-28T12:00:00.123456+00:00"
    zoned = datetime(2026, 11, 28, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    assert format_commit_ts(zoned) == "2026-11-28T12:00:00.000000+00:00"


def test_ids_are_stable() -> None:
    change = Change(Op.INSERT, 3, TABLE, new=values(ROW_TEXT))
    first, second = one(change), one(change)
    assert first == second
    assert first.id == "washington/0/1A2B3C4/3"
    assert first.lsn == "0/1A2B3C4"
    assert first.commit_ts == "2026-11-28T12:00:00.123456+00:00"


# -- typed values ------------------------------------------------------------------------------

def test_insert_types_every_column() -> None:
    event = one(Change(Op.INSERT, 0, TABLE, new=values(ROW_TEXT)))
    assert event.row == ROW_JSON
    assert event.op == "insert"
    assert event.topic == event.table == "public.grants"
    assert event.key == {"id": 7}
    assert event.old is None
    # The JSON text is valid strict JSON (no NaN tokens) and round-trips.
    assert json.loads(event.to_json()) == event.as_dict()
    assert "NaN" not in event.to_json().replace('"NaN"', "")


@pytest.mark.parametrize(("oid", "text", "expected"), [
    (21, "32767", 32767), (23, "-2147483648", -2147483648), (20, "-9223372036854775808",
                                                             -9223372036854775808),
    (26, "0", 0),
    (700, "3.4028235e+38", 3.4028235e+38), (701, "0.1", 0.1), (701, "NaN", "NaN"),
    (701, "Infinity", "Infinity"), (701, "-Infinity", "-Infinity"), (700, "NaN", "NaN"),
    (701, "1e+308", 1e308), (701, "-0", -0.0),
    (1700, "3.14159265358979323846264338327950288", "3.14159265358979323846264338327950288"),
    (1700, "NaN", "NaN"), (1700, "Infinity", "Infinity"),
    (16, "t", True), (16, "f", False),
    (114, '{"x": 1e400, "y": 12345678901234567890123}',
     {"x": "1e400", "y": 12345678901234567890123}),
    (3802, "[1, \"two\", null, false]", [1, "two", None, False]),
    (3802, "\"just a string\"", "just a string"),
    (1082, "2026-11-28", "2026-11-28"), (17, "\\x00ff", "\\x00ff"),
    (1186, "1 day 02:00:00", "1 day 02:00:00"), (3904, "[1,5)", "[1,5)"),
])
def test_scalar_types(oid: int, text: str, expected: Any) -> None:
    table = make_table([("id", 23), ("v", oid)])
    event = one(Change(Op.INSERT, 0, table, new=("1", text)))
    assert event.row is not None
    assert event.row["v"] == expected
    assert type(event.row["v"]) is type(expected)
    json.loads(event.to_json())  # always strict JSON


def test_null_values_stay_null_and_bad_text_falls_back() -> None:
    table = make_table([("id", 23), ("v", 23), ("w", 1007)])
    event = one(Change(Op.INSERT, 0, table, new=("1", None, "{oops")))
    assert event.row == {"id": 1, "v": None, "w": "{oops"}
    event = one(Change(Op.INSERT, 0, table, new=("1", "not a number", None)))
    assert event.row == {"id": 1, "v": "not a number", "w": None}


def test_binary_values_as_hex() -> None:
    table = make_table([("id", 23), ("v", 17)])
    event = one(Change(Op.INSERT, 0, table, new=("1", b"\x00\xff")))
    assert event.row == {"id": 1, "v": "\\x00ff"}


@pytest.mark.parametrize(("text", "expected"), [
    ("{}", []),
    ("{1,2,3}", ["1", "2", "3"]),
    ("{NULL,null,\"NULL\"}", [None, None, "NULL"]),
    ('{"a,b","c\\\\d","e\\"f","",  g  }', ["a,b", "c\\d", 'e"f', "", "g"]),
    ('{"{braces}","with space"}', ["{braces}", "with space"]),
    ("{{1,2},{3,4}}", [["1", "2"], ["3", "4"]]),
    ("{{{1},{2}},{{3},{NULL}}}", [[["1"], ["2"]], [["3"], [None]]]),
    ("[0:1]={7,8}", ["7", "8"]),
    ("[1:2][1:1]={{a},{b}}", [["a"], ["b"]]),
    ('{"\\u00e9",é}', ["u00e9", "é"]),
])
def test_parse_array(text: str, expected: list[Any]) -> None:
    assert parse_array(text) == expected


@pytest.mark.parametrize("text", ["", "{1,}", "{,1}", "{1", "{1}}", "{{1}", "{1}x", "1",
                                  "{1,{2}}", '{"a}'])
def test_parse_array_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_array(text)


def test_array_element_typing() -> None:
    assert converter_for(1007)("{1,NULL,-3}") == [1, None, -3]  # type: ignore[misc]
    assert converter_for(1021)("{NaN,2.5}") == ["NaN", 2.5]  # type: ignore[misc]
    assert converter_for(1231)("{1.50,NaN}") == ["1.50", "NaN"]  # type: ignore[misc]
    assert converter_for(199)('{"{\\"a\\":[1]}"}') == [{"a": [1]}]  # type: ignore[misc]
    assert converter_for(25) is None
    assert converter_for(99999) is None


# -- row shapes --------------------------------------------------------------------------------

def test_unchanged_toast_is_omitted_from_row() -> None:
    table = make_table([("id", 23), ("doc", 25), ("n", 23)])
    event = one(Change(Op.UPDATE, 1, table, new=("1", UNCHANGED_TOAST, "5")))
    assert event.row == {"id": 1, "n": 5}
    assert "doc" not in event.row
    assert event.old is None
    assert event.key == {"id": 1}


def test_update_with_key_change_sends_old_key_only() -> None:
    table = make_table([("id", 23), ("name", 25)])
    event = one(Change(Op.UPDATE, 2, table, new=("2", "b"), old=("1", None), old_is_key=True))
    assert event.key == {"id": 2}
    assert event.row == {"id": 2, "name": "b"}
    assert event.old == {"id": 1}


def test_update_with_full_old_row() -> None:
    table = make_table([("id", 23), ("name", 25)], key=(0, 1))
    event = one(Change(Op.UPDATE, 0, table, new=("1", "b"), old=("1", None)))
    assert event.old == {"id": 1, "name": None}
    assert event.key == {"id": 1, "name": "b"}


def test_toasted_key_value_taken_from_old() -> None:
    table = make_table([("k", 25), ("v", 23)])
    event = one(Change(Op.UPDATE, 0, table, new=(UNCHANGED_TOAST, "2"), old=("big", "1")))
    assert event.key == {"k": "big"}


def test_delete_uses_old_row() -> None:
    table = make_table([("id", 23), ("name", 25)])
    event = one(Change(Op.DELETE, 4, table, old=("9", None), old_is_key=True))
    assert event.op == "delete"
    assert event.key == {"id": 9}
    assert event.row is None
    assert event.old == {"id": 9}


def test_table_without_key() -> None:
    table = make_table([("a", 23)], key=())
    event = one(Change(Op.INSERT, 0, table, new=("1",)))
    assert event.key is None


def test_composite_key_order() -> None:
    table = make_table([("a", 23), ("b", 25), ("c", 23)], key=(2, 0))
    event = one(Change(Op.INSERT, 0, table, new=("1", "x", "3")))
    assert list(event.key or {}) == ["c", "a"]


# -- truncate ----------------------------------------------------------------------------------

def test_truncate_one_event_per_table() -> None:
    a, b = make_table(name="a"), make_table(name="b")
    change = Change(Op.TRUNCATE, 5, truncated=(a, b))
    events = events_for_change("w", BEGIN, change)
    assert [e.topic for e in events] == ["public.a", "public.b"]
    assert [e.id for e in events] == ["w/0/1A2B3C4/5.0", "w/0/1A2B3C4/5.1"]
    for e in events:
        assert (e.op, e.key, e.row, e.old) == ("truncate", None, None, None)
        assert e.table == e.topic
    with pytest.raises(ValueError):
        change_to_event("w", BEGIN, change)
    single = one(Change(Op.TRUNCATE, 5, truncated=(a,)), "w")
    assert single.id == "w/0/1A2B3C4/5"
    filtered = events_for_change("w", BEGIN, change, tables=["public.b"])
    assert [e.id for e in filtered] == ["w/0/1A2B3C4/5.1"]


# -- messages ----------------------------------------------------------------------------------

def test_emitted_message() -> None:
    change = Change(Op.MESSAGE, 2, prefix="cdc_sync:orders.paid",
                    content=json.dumps({"order": 7, "amount": "1.50"}).encode())
    event = one(change)
    assert event.topic == "orders.paid"
    assert event.op == "message"
    assert event.row == {"order": 7, "amount": "1.50"}
    assert event.table is None and event.key is None and event.old is None
    assert event.id == "washington/0/1A2B3C4/2"


def test_other_prefixes() -> None:
    text = one(Change(Op.MESSAGE, 0, prefix="audit", content="héllo".encode()))
    assert (text.topic, text.row) == ("audit", {"content": "héllo"})
    raw = one(Change(Op.MESSAGE, 0, prefix="bin", content=b"\xff\x00"))
    assert raw.row == {"content": "/wA=", "encoding": "base64"}
    # cdc_sync: prefix but not a JSON object: treated like any other prefix
    odd = one(Change(Op.MESSAGE, 0, prefix="cdc_sync:x", content=b"[1]"))
    assert (odd.topic, odd.row) == ("cdc_sync:x", {"content": "[1]"})


def test_heartbeat_produces_no_event() -> None:
    change = Change(Op.MESSAGE, 0, prefix="cdc_sync.heartbeat", content=b"2026-11-28")
    assert change_to_event("w", BEGIN, change) is None
    assert outbox_rows("w", BEGIN, [change]) == []


# -- outbox rows -------------------------------------------------------------------------------

def test_outbox_rows() -> None:
    other = make_table([("id", 23)], name="other")
    changes = [
        Change(Op.INSERT, 0, TABLE, new=values(ROW_TEXT)),
        Change(Op.INSERT, 1, other, new=("1",)),
        Change(Op.MESSAGE, 2, prefix="cdc_sync.heartbeat", content=b""),
        Change(Op.MESSAGE, 3, prefix="cdc_sync:public.note", content=b'{"a":1}'),
    ]
    rows = outbox_rows("w", BEGIN, changes)
    assert [r[0] for r in rows] == ["w/0/1A2B3C4/0", "w/0/1A2B3C4/1", "w/0/1A2B3C4/3"]
    for (id_, source, topic, text, ts), event in zip(
            rows, transaction_events("w", BEGIN, changes), strict=True):
        assert (id_, source, topic, ts) == (event.id, "w", event.topic, BEGIN.commit_ts)
        assert json.loads(text) == event.as_dict()
        assert list(json.loads(text)) == ["id", "source", "topic", "table", "op", "lsn",
                                          "commit_ts", "key", "row", "old"]
    filtered = outbox_rows("w", BEGIN, changes, tables=["public.g*", "public.note"])
    assert [r[2] for r in filtered] == ["public.grants", "public.note"]


def test_outbox_rows_strip_nul_for_jsonb() -> None:
    change = Change(Op.MESSAGE, 0, prefix="cdc_sync:t", content=b'{"a":"x\\u0000y"}')
    (row,) = outbox_rows("w", BEGIN, [change])
    assert json.loads(row[3])["row"] == {"a": "x\ufffdy"}
    assert one(change).row == {"a": "x\x00y"}  # subscribers get the exact value
    table = make_table([("id", 23), ("j", 114), ("t", 25)])
    change = Change(Op.INSERT, 0, table, new=("1", '{"lone": "\\ud800", "pair": "\\ud83d\\ude00"}',
                                              "😀 é"))
    (row,) = outbox_rows("w", BEGIN, [change])
    assert row[3].isascii()
    assert json.loads(row[3])["row"] == {"id": 1, "j": {"lone": "\ufffd", "pair": "😀"},
                                         "t": "😀 é"}


def test_outbox_rows_are_accepted_by_jsonb(make_db: Callable[..., str]) -> None:
    dsn = make_db("events")
    table = make_table([("id", 23), ("j", 114), ("t", 25), ("f", 1022)])
    changes = [
        Change(Op.INSERT, 0, table, new=("1", '{"lone": "\\ud800", "nul": "\\u0000"}',
                                         "😀 é \\", "{NaN,-Infinity,1.5}")),
        Change(Op.MESSAGE, 1, prefix="cdc_sync:x", content=b'{"a":"\\u0000"}'),
        Change(Op.MESSAGE, 2, prefix="raw", content=b"\xff"),
    ]
    rows = outbox_rows("w", BEGIN, changes)
    with psycopg.connect(dsn, autocommit=True) as conn:
        back = [conn.execute("SELECT %s::jsonb::text", (r[3],)).fetchone() for r in rows]
    assert [json.loads(b[0]) if b else None for b in back] == [json.loads(r[3]) for r in rows]


def test_event_dicts_wanted_skips_conversion() -> None:
    seen: list[str] = []

    def wanted(topic: str) -> bool:
        seen.append(topic)
        return topic == "public.grants"

    other = make_table([("id", 23)], name="other")
    out = event_dicts("w", BEGIN, [Change(Op.INSERT, 0, other, new=("1",)),
                                   Change(Op.INSERT, 1, TABLE, new=values(ROW_TEXT))],
                      wanted=wanted)
    assert [d["topic"] for d in out] == ["public.grants"]
    assert seen == ["public.other", "public.grants"]


def test_event_from_dict_roundtrip() -> None:
    event = one(Change(Op.INSERT, 0, TABLE, new=values(ROW_TEXT)))
    assert Event.from_dict(json.loads(event.to_json())) == event


# -- against PostgreSQL's own JSON conversion --------------------------------------------------
# (oid and numeric are left out: to_jsonb makes oid a string and numeric a number, our
# contract is the other way round.)

CASES = [
    ("1::int2", 21), ("(-2147483648)::int4", 23), ("9223372036854775807::int8", 20),
    ("'1.1'::float4", 700), ("'0.1'::float8", 701),
    ("'NaN'::float8", 701), ("'-Infinity'::float8", 701), ("1e-320::float8", 701),
    ("true", 16), ("false", 16),
    ("'{\"a\": [1, 2.5, null, {\"b\": \"\\u00e9\"}]}'::jsonb", 3802),
    ("'[1, \"x\"]'::json", 114),
    ("ARRAY[1, NULL, 3]::int4[]", 1007), ("ARRAY[[1,2],[3,4]]::int8[]", 1016),
    ("ARRAY['a b', 'c\"d', 'e\\f', 'NULL', NULL, '', '{x}', 'é,']::text[]", 1009),
    ("ARRAY['NaN', 'Infinity', '1.5']::float8[]", 1022),
    ("ARRAY[true, NULL]::bool[]", 1000),
    ("ARRAY['{\"a\": 1}', '[1,2]', NULL]::jsonb[]", 3807),
    ("ARRAY[[['x']], [['y']]]::text[]", 1009),
    ("'[0:2]={1,2,3}'::int4[]", 1007),
    ("'{}'::int4[]", 1007),
    ("ARRAY['2026-01-01'::date, NULL]", 1182),
]


def test_converters_agree_with_postgres(make_db: Callable[..., str]) -> None:
    dsn = make_db("events")
    options = "-c extra_float_digits=3 -c DateStyle=ISO -c TimeZone=UTC"
    with psycopg.connect(dsn, autocommit=True, options=options) as conn:
        for expr, oid in CASES:
            row = conn.execute(f"SELECT format('%s', {expr}), to_jsonb({expr})::text, "
                               f"pg_typeof({expr})::regtype::oid::int").fetchone()
            assert row is not None
            text, pg_json, type_oid = row
            assert type_oid == oid, expr
            convert = converter_for(oid)
            assert convert is not None
            assert convert(text) == json.loads(pg_json), expr


def test_array_table_matches_pg_type(make_db: Callable[..., str]) -> None:
    from cdc_sync.events import _ARRAYS

    dsn = make_db("events")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT a.oid::int, a.typelem::int, e.typdelim FROM pg_type a "
                            "JOIN pg_type e ON e.oid = a.typelem WHERE a.oid = ANY(%s)",
                            (list(_ARRAYS),)).fetchall()
    found = {oid: (elem, delim) for oid, elem, delim in rows}
    for array_oid, element_oid in _ARRAYS.items():
        if array_oid not in found:
            continue  # not in this server version
        assert found[array_oid][0] == element_oid, array_oid
    assert len(found) >= len(_ARRAYS) - 2
    delimiters = {oid for oid, (_elem, delim) in found.items() if delim != ","}
    assert delimiters == {1020}  # box: the one built-in type delimited by ';'

"""RealTimeSync: listener logic fed directly, emit_change against a real database, end to end."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from cdc_sync.api import AsyncRealTimeSync, ChangeEvent, RealTimeSync, emit_change
from cdc_sync.changes import Change, Op, Table, TxBegin, TxChanges, TxCommit, TxItem
from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.protocol import Lsn, Message, ReplicaIdentity, decode_message

TS = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def settings(dsn: str = "postgresql://u@127.0.0.1:1/db") -> Settings:
    return settings_from_dict({"source": {"name": "hq", "dsn": dsn},
                               "sites": [{"name": "a", "dsn": dsn}]})


def table(name: str, schema: str = "public") -> Table:
    return Table(oid=1, schema=schema, name=name, columns=("id", "amount"),
                 type_oids=(23, 1700), type_modifiers=(-1, -1), key=(0,),
                 replica_identity=ReplicaIdentity.DEFAULT)


def tx(lsn: int, *changes: Change, commit: bool = True) -> list[TxItem]:
    items: list[TxItem] = [TxBegin(lsn, Lsn(lsn), TS, None), TxChanges(tuple(changes))]
    if commit:
        items.append(TxCommit(Lsn(lsn), Lsn(lsn + 8), TS))
    return items


def ins(pos: int, name: str, id_: int) -> Change:
    return Change(Op.INSERT, pos, table(name), new=(str(id_), "1.50"))


def feed(rts: RealTimeSync, items: list[TxItem]) -> None:
    for item in items:
        rts._on_item(item)


def collector() -> tuple[list[ChangeEvent], Callable[[ChangeEvent], None]]:
    got: list[ChangeEvent] = []
    return got, got.append


def test_pattern_filtering_and_event_shape() -> None:
    rts = RealTimeSync(settings())
    orders, on_orders = collector()
    public, on_public = collector()
    rts.subscribe("public.orders", on_orders)
    rts.subscribe("public.*", on_public)
    feed(rts, tx(0x100, ins(0, "orders", 1), ins(1, "users", 2)))
    assert [e.id for e in orders] == ["hq/0/100/0"]
    assert [e.topic for e in public] == ["public.orders", "public.users"]
    event = orders[0]
    assert (event.op, event.table, event.key, event.data, event.old) == (
        "insert", "public.orders", {"id": 1}, {"id": 1, "amount": "1.50"}, None)
    assert event.lsn == "0/100" and event.commit_ts == TS and event.source == "hq"


def test_commit_order_and_dispatch_at_commit() -> None:
    rts = RealTimeSync(settings())
    got, handler = collector()
    rts.subscribe("*", handler)
    items = tx(0x100, ins(0, "a", 1), ins(1, "b", 2))
    feed(rts, items[:2])
    assert got == []  # nothing before the commit
    feed(rts, items[2:])
    feed(rts, tx(0x200, ins(0, "a", 3)) + tx(0x300, ins(0, "c", 4), ins(1, "a", 5)))
    assert [e.id for e in got] == ["hq/0/100/0", "hq/0/100/1", "hq/0/200/0", "hq/0/300/0",
                                   "hq/0/300/1"]


def test_abandoned_and_replayed_transactions() -> None:
    rts = RealTimeSync(settings())
    got, handler = collector()
    rts.subscribe("*", handler)
    feed(rts, tx(0x100, ins(0, "a", 1)))
    # A transaction cut off by a lost connection, then the stream replays from the sites'
    # position: the committed 0x100 again (skipped) and 0x200 whole.
    feed(rts, tx(0x200, ins(0, "a", 2), commit=False))
    feed(rts, tx(0x100, ins(0, "a", 1)))
    feed(rts, tx(0x200, ins(0, "a", 2), ins(1, "a", 3)))
    assert [e.id for e in got] == ["hq/0/100/0", "hq/0/200/0", "hq/0/200/1"]


def test_failing_handler_is_isolated(caplog: pytest.LogCaptureFixture) -> None:
    rts = RealTimeSync(settings())
    before, on_before = collector()
    after, on_after = collector()

    def boom(event: ChangeEvent) -> None:
        raise RuntimeError("handler bug")

    rts.subscribe("*", on_before)
    rts.subscribe("*", boom)
    rts.subscribe("*", on_after)
    with caplog.at_level(logging.ERROR, logger="cdc_sync.api"):
        feed(rts, tx(0x100, ins(0, "a", 1), ins(1, "a", 2)))
        feed(rts, tx(0x200, ins(0, "a", 3)))
    assert len(before) == len(after) == 3
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 3
    assert "hq/0/100/0" in failures[0].getMessage()


def test_unsubscribe() -> None:
    rts = RealTimeSync(settings())
    got, handler = collector()
    unsubscribe = rts.subscribe("public.a", handler)
    feed(rts, tx(0x100, ins(0, "a", 1)))
    unsubscribe()
    unsubscribe()  # idempotent
    feed(rts, tx(0x200, ins(0, "a", 2)))
    assert [e.id for e in got] == ["hq/0/100/0"]


def test_sources_limit_what_is_converted() -> None:
    rts = RealTimeSync(settings(), sources=["public.a", "orders.*"])
    got, handler = collector()
    rts.subscribe("*", handler)
    message = Change(Op.MESSAGE, 1, prefix="cdc_sync:orders.paid", content=b'{"order": 7}')
    heartbeat = Change(Op.MESSAGE, 2, prefix="cdc_sync.heartbeat", content=b"")
    feed(rts, tx(0x100, ins(0, "a", 1), message, heartbeat, ins(3, "b", 2)))
    assert [(e.topic, e.op, e.data) for e in got] == [
        ("public.a", "insert", {"id": 1, "amount": "1.50"}),
        ("orders.paid", "message", {"order": 7}),
    ]
    assert got[1].table is None and got[1].key is None


def test_delete_and_truncate_data() -> None:
    rts = RealTimeSync(settings())
    got, handler = collector()
    rts.subscribe("*", handler)
    delete = Change(Op.DELETE, 0, table("a"), old=("5", None), old_is_key=True)
    truncate = Change(Op.TRUNCATE, 1, truncated=(table("a"), table("b")))
    feed(rts, tx(0x100, delete, truncate))
    assert [(e.op, e.data, e.key) for e in got] == [
        ("delete", {"id": 5}, {"id": 5}), ("truncate", None, None), ("truncate", None, None)]


def test_subscribe_validates() -> None:
    rts = RealTimeSync(settings())
    with pytest.raises(ValueError):
        rts.subscribe("", print)
    with pytest.raises(TypeError):
        rts.subscribe("*", "not callable")  # type: ignore[arg-type]


@pytest.mark.parametrize(("topic", "data", "error"), [
    ("", {}, ValueError), ("a\x00b", {}, ValueError), ("t", [1], TypeError),
    ("t", {"x": float("nan")}, ValueError), ("t", {"x": object()}, ValueError),
])
def test_emit_change_validates(topic: str, data: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        RealTimeSync(settings()).emit_change(topic, data)


# -- against a real database -------------------------------------------------------------------

def decoded_messages(conn: psycopg.Connection[Any], slot: str) -> list[Message]:
    """The logical messages a pgoutput slot streams (decoded by our own decoder)."""
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'emit_pub', 'messages', 'true')",
        (slot,)).fetchall()
    return [m for m in (decode_message(bytes(r[0])) for r in rows) if isinstance(m, Message)]


def test_emit_change_follows_the_transaction(make_db: Callable[..., str]) -> None:
    dsn = make_db("emit")
    rts = RealTimeSync(settings(dsn))
    slot = f"emit_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("CREATE PUBLICATION emit_pub")
        admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            with psycopg.connect(dsn) as app:
                lsn = rts.emit_change("orders.cancelled", {"order": 1}, connection=app)
                assert Lsn.parse(lsn) > 0
                app.rollback()
                rts.emit_change("orders.paid", {"order": 2, "note": "é"}, connection=app)
                app.commit()
            lsn = rts.emit_change("orders.shipped", {"order": 3})  # its own connection
            Lsn.parse(lsn)
            messages = decoded_messages(admin, slot)
        finally:
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert [m.prefix for m in messages] == ["cdc_sync:orders.paid", "cdc_sync:orders.shipped"]
    assert all(m.transactional for m in messages)
    assert json.loads(messages[0].content) == {"order": 2, "note": "é"}
    assert messages[1].lsn == Lsn.parse(lsn)


def test_module_level_emit_change(make_db: Callable[..., str]) -> None:
    dsn = make_db("emit")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert Lsn.parse(emit_change(conn, "t", {"a": 1})) > 0


def test_emit_change_unreachable_source_is_one_line() -> None:
    rts = RealTimeSync(settings("postgresql://u:pw@127.0.0.1:1/db?connect_timeout=2"))
    from cdc_sync.errors import SourceError
    with pytest.raises(SourceError) as info:
        rts.emit_change("t", {})
    assert "pw" not in str(info.value) and "\n" not in str(info.value)


def test_async_flavour(make_db: Callable[..., str]) -> None:
    import asyncio

    dsn = make_db("emit")

    async def main() -> tuple[str, str, list[str]]:
        arts = AsyncRealTimeSync(settings(dsn))
        seen: list[str] = []

        async def handler(event: ChangeEvent) -> None:
            await asyncio.sleep(0)
            seen.append(event.id)

        arts.subscribe("*", handler)
        arts._loop = asyncio.get_running_loop()
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn:
            first = await arts.emit_change("t", {"a": 1}, connection=conn)
        second = await arts.emit_change("t", {"a": 2})
        # the listener thread dispatches to the loop and waits for each handler
        thread = threading.Thread(target=feed, args=(arts.sync, tx(0x100, ins(0, "a", 1),
                                                                     ins(1, "a", 2))))
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        return first, second, seen

    first, second, seen = asyncio.run(main())
    assert Lsn.parse(first) < Lsn.parse(second)
    assert seen == ["hq/0/100/0", "hq/0/100/1"]


# -- end to end: the pipeline with this object as a listener ----------------------------------

def test_end_to_end(make_db: Callable[..., str]) -> None:
    from cdc_sync import commands

    source, site = make_db("rt_src"), make_db("rt_site")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, amount numeric, "
                     "tags text[], meta jsonb)")
    slot = f"s_{psycopg.conninfo.conninfo_to_dict(source)['dbname']}".lower()
    cfg = settings_from_dict({
        "source": {"name": "hq", "dsn": source, "slot": slot, "publication": f"p_{slot}"},
        "sites": [{"name": "a", "dsn": site}],
    })
    commands.init(cfg)
    got: list[ChangeEvent] = []
    done = threading.Event()

    def handler(event: ChangeEvent) -> None:
        got.append(event)
        if event.topic == "orders.done":
            done.set()

    try:
        with RealTimeSync(cfg, sources=["public.orders", "orders.*"]) as rts:
            rts.subscribe("*", handler)
            with psycopg.connect(source) as app:
                app.execute("INSERT INTO public.orders VALUES "
                            "(1, 1.50, '{a,\"b c\",NULL}', '{\"x\": [1, true]}')")
                rts.emit_change("orders.paid", {"order": 1}, connection=app)
                app.commit()
                app.execute("UPDATE public.orders SET amount = 'NaN' WHERE id = 1")
                rts.emit_change("orders.never", {"order": 1}, connection=app)
                app.rollback()
                app.execute("DELETE FROM public.orders WHERE id = 1")
                app.commit()
            rts.emit_change("orders.done", {})
            assert done.wait(60), f"no events arrived: {got}"
            assert rts.error is None
    finally:
        _teardown(cfg)
    assert [(e.op, e.topic) for e in got] == [
        ("insert", "public.orders"), ("message", "orders.paid"), ("delete", "public.orders"),
        ("message", "orders.done")]
    assert got[0].data == {"id": 1, "amount": "1.50", "tags": ["a", "b c", None],
                           "meta": {"x": [1, True]}}
    assert got[0].lsn == got[1].lsn  # one transaction
    assert got[2].key == {"id": 1}


def _teardown(cfg: Settings) -> None:
    """`commands.teardown`, allowing the server a moment to see the walsender gone."""
    from cdc_sync import commands
    from cdc_sync.errors import SourceError

    deadline = time.monotonic() + 15
    while True:
        try:
            commands.teardown(cfg)
            return
        except SourceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)

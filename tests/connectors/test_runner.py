"""ConnectorRunner against a real outbox: at-least-once in seq order, filters, pruning, status."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from cdc_sync.changes import Change, Op, Table, TxBegin
from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.connectors import (
    ConnectorBusy,
    ConnectorRunner,
    backlog,
    connector_status,
    prune_outbox,
)
from cdc_sync.events import outbox_rows
from cdc_sync.protocol import Lsn, ReplicaIdentity
from cdc_sync.sinks.schema import migrate_site

SOURCE = "washington"


def table(name: str) -> Table:
    return Table(oid=1, schema="public", name=name, columns=("id", "v"), type_oids=(23, 25),
                 type_modifiers=(-1, -1), key=(0,), replica_identity=ReplicaIdentity.DEFAULT)


class Outbox:
    """Writes outbox rows the way the outbox site's applier does: one transaction per source
    transaction, set-based, ON CONFLICT (id) DO NOTHING."""

    def __init__(self, dsn: str, source: str = SOURCE) -> None:
        self.dsn = dsn
        self.source = source
        self.lsn = 0x1000
        self.ids: list[str] = []

    def write(self, topics: Sequence[str], *, messages: int = 0) -> list[str]:
        self.lsn += 0x100
        begin = TxBegin(xid=self.lsn, commit_lsn=Lsn(self.lsn),
                        commit_ts=datetime.now(UTC), origin=None)
        changes = [Change(Op.INSERT, i, table(t.split(".", 1)[1]), new=(str(i), "x"))
                   for i, t in enumerate(topics)]
        changes += [Change(Op.MESSAGE, len(topics) + i, prefix="cdc_sync:note",
                           content=b'{"n": %d}' % i) for i in range(messages)]
        rows = outbox_rows(self.source, begin, changes)
        with psycopg.connect(self.dsn) as conn:
            ids, sources, tops, events, stamps = (list(c) for c in zip(*rows, strict=True))
            conn.execute(
                "INSERT INTO cdc_sync.outbox (id, source, topic, event, commit_ts) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::jsonb[], "
                "%s::timestamptz[]) ON CONFLICT (id) DO NOTHING",
                (ids, sources, tops, events, stamps))
        self.ids += ids
        return ids


class FlakyClient:
    """Receives every batch; every `fail_every`-th request fails *after* the receiver saw it
    (a lost acknowledgement), so the runner must redeliver the same batch."""

    def __init__(self, fail_every: int = 3) -> None:
        self.fail_every = fail_every
        self.requests = 0
        self.received: list[str] = []
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def deliver(self, events: list[dict[str, Any]]) -> None:
        with self.lock:
            self.requests += 1
            ids = [e["id"] for e in events]
            self.batches.append(ids)
            self.received += ids
            if self.fail_every and self.requests % self.fail_every == 0:
                raise RuntimeError("endpoint said no (simulated)")


def make_settings(dsn: str, connectors: list[dict[str, Any]] | None = None,
                  retention: float = 3600.0) -> Settings:
    if connectors is None:
        connectors = [{"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/",
                       "batch_size": 7}]
    return settings_from_dict({
        "source": {"name": SOURCE, "dsn": dsn},
        "sites": [{"name": "berlin", "dsn": dsn}],
        "outbox": {"retention_seconds": retention},
        "connectors": connectors,
    })


@pytest.fixture
def outbox_dsn(make_db: Callable[..., str]) -> str:
    dsn = make_db("outbox")
    migrate_site(dsn)
    return dsn


def state(dsn: str, name: str = "hook") -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM cdc_sync.connector_state WHERE connector = %s", (name,))
        row = cur.fetchone()
        assert row is not None and cur.description is not None
        return dict(zip([d.name for d in cur.description], row, strict=True))


def max_seq(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT max(seq) FROM cdc_sync.outbox").fetchone()
        return int(row[0]) if row and row[0] is not None else 0


def seq_order(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM cdc_sync.outbox ORDER BY seq")]


def drain(runner: ConnectorRunner, limit: int = 500) -> int:
    """Step until caught up, swallowing failures like `run` does; returns the failures."""
    failures = 0
    for _ in range(limit):
        try:
            if runner.step() == 0:
                return failures
        except Exception:
            failures += 1
    raise AssertionError("runner did not catch up")


def assert_at_least_once_in_order(received: list[str], batches: list[list[str]],
                                  expected: list[str]) -> None:
    first_seen: list[str] = []
    seen: set[str] = set()
    for event_id in received:
        if event_id not in seen:
            seen.add(event_id)
            first_seen.append(event_id)
    assert first_seen == expected  # every event, in seq order
    # duplicates only as redeliveries: a batch after a failed one repeats it exactly or is new
    for prev, batch in zip(batches, batches[1:], strict=False):
        if set(batch) & set(prev):
            assert batch[:len(prev)] == prev[:len(batch)]


def test_flaky_endpoint_gets_everything_in_order(outbox_dsn: str) -> None:
    box = Outbox(outbox_dsn)
    for i in range(12):
        box.write([f"public.t{i % 3}"] * (i % 5 + 1), messages=i % 2)
    settings = make_settings(outbox_dsn)
    client = FlakyClient(fail_every=3)
    runner = ConnectorRunner(settings, settings.connectors[0], client=client)
    try:
        failures = drain(runner)
    finally:
        runner.close()
    assert failures > 0
    expected = seq_order(outbox_dsn)
    assert expected == box.ids
    assert_at_least_once_in_order(client.received, client.batches, expected)
    assert len(client.received) > len(expected)  # there were redeliveries
    assert all(len(b) <= 7 for b in client.batches)
    st = state(outbox_dsn)
    assert st["delivered_seq"] == max_seq(outbox_dsn)
    assert st["last_error"] == "RuntimeError: endpoint said no (simulated)"
    assert st["last_error_at"] is not None and st["last_delivery_at"] is not None


def test_run_loop_with_concurrent_writes(outbox_dsn: str) -> None:
    box = Outbox(outbox_dsn)
    settings = make_settings(outbox_dsn)
    client = FlakyClient(fail_every=3)
    runner = ConnectorRunner(settings, settings.connectors[0], client=client,
                             poll_interval=0.02, backoff_base=0.01, backoff_cap=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,))
    thread.start()
    try:
        for i in range(20):
            box.write([f"public.t{i % 4}"] * 3)
            time.sleep(0.005)
        deadline = time.monotonic() + 30
        while state(outbox_dsn)["delivered_seq"] < max_seq(outbox_dsn):
            assert time.monotonic() < deadline, "runner did not catch up"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert_at_least_once_in_order(client.received, client.batches, box.ids)
    assert state(outbox_dsn)["last_error"] is not None


def test_crash_between_delivery_and_commit_redelivers_same_ids(outbox_dsn: str) -> None:
    box = Outbox(outbox_dsn)
    box.write(["public.a"] * 3)
    settings = make_settings(outbox_dsn)
    received: list[list[str]] = []
    runner: ConnectorRunner

    class KillingClient:
        def deliver(self, events: list[dict[str, Any]]) -> None:
            received.append([e["id"] for e in events])
            if len(received) == 1:
                # The endpoint has the batch; the runner's connection dies before it records it.
                conn = runner._conn
                assert conn is not None
                with psycopg.connect(outbox_dsn, autocommit=True) as other:
                    other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))

    runner = ConnectorRunner(settings, settings.connectors[0], client=KillingClient())
    with pytest.raises(psycopg.Error):
        runner.step()
    assert state(outbox_dsn)["delivered_seq"] == 0
    assert runner.step() == 3
    assert received[0] == received[1] == box.ids
    assert runner.step() == 0
    runner.close()


def test_tables_filter_advances_over_filtered_rows(outbox_dsn: str) -> None:
    box = Outbox(outbox_dsn)
    box.write(["public.b"] * 10)               # a whole batch filtered out
    box.write(["public.a1", "public.b", "public.a2"], messages=2)
    box.write(["public.b"] * 3)
    settings = make_settings(outbox_dsn, [{"name": "hook", "kind": "webhook",
                                           "url": "http://127.0.0.1:9/", "batch_size": 4,
                                           "tables": ["public.a*", "note"]}])
    client = FlakyClient(fail_every=0)
    runner = ConnectorRunner(settings, settings.connectors[0], client=client)
    with psycopg.connect(outbox_dsn) as conn:
        runner.step()  # creates the state row
        assert backlog(conn, "hook", source=SOURCE, tables=["public.a*", "note"]) == 4
    assert drain(runner) == 0
    runner.close()
    with psycopg.connect(outbox_dsn) as conn:
        topics: dict[str, str] = dict(conn.execute("SELECT id, topic FROM cdc_sync.outbox").fetchall())
    assert [topics[i] for i in client.received] == ["public.a1", "public.a2", "note", "note"]
    assert all(client.batches)  # no empty POSTs
    assert state(outbox_dsn)["delivered_seq"] == max_seq(outbox_dsn)
    with psycopg.connect(outbox_dsn) as conn:
        assert backlog(conn, "hook") == 0


def test_other_sources_rows_are_not_delivered(outbox_dsn: str) -> None:
    Outbox(outbox_dsn, source="elsewhere").write(["public.a"])
    mine = Outbox(outbox_dsn)
    mine.lsn = 0x9000
    mine.write(["public.a"])
    settings = make_settings(outbox_dsn)
    client = FlakyClient(fail_every=0)
    runner = ConnectorRunner(settings, settings.connectors[0], client=client)
    drain(runner)
    runner.close()
    assert client.received == mine.ids


def test_pruning_deletes_only_delivered_old_rows(outbox_dsn: str) -> None:
    box = Outbox(outbox_dsn)
    for _ in range(6):
        box.write(["public.a"] * 2)
    connectors = [{"name": n, "kind": "webhook", "url": "http://127.0.0.1:9/", "batch_size": 4}
                  for n in ("hook", "slow")]
    settings = make_settings(outbox_dsn, connectors, retention=3600.0)
    seqs = [int(s) for s in _seqs(outbox_dsn)]
    fast = ConnectorRunner(settings, settings.connectors[0], client=FlakyClient(0))
    drain(fast)                                           # "hook" has everything
    with psycopg.connect(outbox_dsn, autocommit=True) as conn:
        # "slow" has no state row yet: it counts as 0, nothing may go.
        assert prune_outbox(conn, settings) == 0
    slow = ConnectorRunner(settings, settings.connectors[1], client=FlakyClient(0))
    slow.step()                                           # "slow" has the first 4 rows
    with psycopg.connect(outbox_dsn, autocommit=True) as conn:
        assert prune_outbox(conn, settings) == 0          # all rows are younger than retention
        conn.execute("UPDATE cdc_sync.outbox SET created_at = now() - interval '2 hours' "
                     "WHERE seq <= %s", (seqs[5],))      # the first 6 are old
        assert prune_outbox(conn, settings) == 4          # old and delivered by both
        assert _seqs(outbox_dsn) == seqs[4:]
    drain(slow)
    assert slow.prune() == 2                              # now the other 2 old ones
    assert _seqs(outbox_dsn) == seqs[6:]
    with psycopg.connect(outbox_dsn, autocommit=True) as conn:
        assert backlog(conn, "hook") == 0 and backlog(conn, "slow") == 0
    fast.close()
    slow.close()


def _seqs(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT seq FROM cdc_sync.outbox ORDER BY seq")]


def test_connector_status(outbox_dsn: str) -> None:
    box = Outbox(outbox_dsn)
    box.write(["public.a"] * 5)
    connectors = [{"name": n, "kind": "webhook", "url": "http://127.0.0.1:9/", "batch_size": 2}
                  for n in ("hook", "never")]
    settings = make_settings(outbox_dsn, connectors)
    client = FlakyClient(fail_every=2)
    runner = ConnectorRunner(settings, settings.connectors[0], client=client)
    runner.step()
    with pytest.raises(RuntimeError):
        runner.step()
    runner.close()
    status = {s["name"]: s for s in connector_status(settings)}
    assert status["hook"]["backlog"] == 3
    assert status["hook"]["delivered_seq"] == _seqs(outbox_dsn)[1]
    assert status["hook"]["last_error"] == "RuntimeError: endpoint said no (simulated)"
    assert isinstance(status["hook"]["last_error_at"], str)
    assert isinstance(status["hook"]["last_delivery_at"], str)
    assert status["never"] == {"name": "never", "backlog": 5, "delivered_seq": 0,
                               "last_error": None, "last_error_at": None,
                               "last_delivery_at": None}


def test_connector_status_unreachable_is_one_line() -> None:
    settings = make_settings("postgresql://u:pw@127.0.0.1:1/nothing?connect_timeout=2")
    from cdc_sync.errors import SiteError
    with pytest.raises(SiteError) as info:
        connector_status(settings)
    assert "pw" not in str(info.value) and "\n" not in str(info.value)
    assert "outbox site berlin" in str(info.value)


def test_one_runner_per_connector(outbox_dsn: str) -> None:
    Outbox(outbox_dsn).write(["public.a"])
    settings = make_settings(outbox_dsn)
    first = ConnectorRunner(settings, settings.connectors[0], client=FlakyClient(0))
    second = ConnectorRunner(settings, settings.connectors[0], client=FlakyClient(0))
    assert first.step() == 1
    with pytest.raises(ConnectorBusy):
        second.step()
    first.close()
    assert second.step() == 0
    second.close()


def test_backoff_is_full_jitter_capped(outbox_dsn: str) -> None:
    settings = make_settings(outbox_dsn)
    runner = ConnectorRunner(settings, settings.connectors[0], client=FlakyClient(0))
    for failures, ceiling in [(1, 0.5), (2, 1.0), (5, 8.0), (8, 60.0), (500, 60.0)]:
        delays = [runner.backoff_delay(failures) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2

"""Two replicators applying into one site through the resolving path (`_resolving`, `_locks`).

Each `SiteWriter` here stands for the replicator of another office writing into the same site
database. The deadlock that the key buckets exist to prevent: replicator A's target
transaction holds key 1 and then needs key 2 while B's holds key 2 and then needs key 1 (their
chunks arrive in opposite orders). With locks per chunk that cycle is reachable; with every
bucket taken up front by a transaction that may apply more chunks (`final=False`) it is not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from integration.helpers import connect, execute, scalar

from cdc_sync.changes import Change, Op, Table, TxBegin
from cdc_sync.config import ResolvedPolicy
from cdc_sync.protocol import Lsn, ReplicaIdentity
from cdc_sync.resolve import make_resolver
from cdc_sync.sessions import connect_site
from cdc_sync.sinks._locks import BUCKETS, bucket_of
from cdc_sync.sinks.schema import migrate_site, register_source
from cdc_sync.sinks.site import SiteOptions, SiteWriter

ITEM = Table(16384, "public", "item", ("id", "qty", "v"), (23, 23, 23), (-1, -1, -1), (0,),
             ReplicaIdentity.DEFAULT)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def site(make_db: Callable[..., str]) -> str:
    dsn = make_db("locks")
    migrate_site(dsn)
    execute(dsn, "CREATE TABLE item (id int PRIMARY KEY, qty int NOT NULL, v int NOT NULL)",
            "INSERT INTO item SELECT g, 0, 0 FROM generate_series(1, 10) g")
    return dsn


def _writer(dsn: str, source: str) -> SiteWriter:
    policy = ResolvedPolicy(table="public.item", strategy="lww", version_column="v",
                            counters=(), merge=None, merge_key=None,
                            tombstone_max_age_seconds=3600.0)
    resolver = make_resolver(policy, site="site")
    opts = SiteOptions(source=source, site="site", resolver_for=lambda _q: resolver)
    return SiteWriter(connect_site(dsn), source, options=opts)


@pytest.fixture
def writers(site: str) -> Iterator[tuple[SiteWriter, SiteWriter]]:
    a, b = _writer(site, "a"), _writer(site, "b")
    yield a, b
    a.conn.close()
    b.conn.close()


def _set(key: int, qty: int, version: int) -> Change:
    return Change(Op.UPDATE, 0, ITEM, (str(key), str(qty), str(version)))


def _begin(n: int) -> TxBegin:
    return TxBegin(n, Lsn(0x1000 + n), T0 + timedelta(seconds=n), None)


def _two_keys_in_different_buckets() -> tuple[int, int]:
    for k in range(2, 1000):
        if bucket_of("public.item", ("1",)) != bucket_of("public.item", (str(k),)):
            return 1, k
    raise AssertionError("no two keys in different buckets")


def test_buckets_are_stable_and_spread() -> None:
    """The same key maps to the same bucket in every process (no salted hash)."""
    assert bucket_of("public.item", ("1",)) == bucket_of("public.item", ("1",))
    seen = {bucket_of("public.item", (str(i),)) for i in range(2000)}
    assert len(seen) == BUCKETS


def test_opposite_chunk_orders_do_not_deadlock(site: str,
                                               writers: tuple[SiteWriter, SiteWriter]) -> None:
    """A: chunk (key x), later chunk (key y); B: chunk (key y), later chunk (key x). B starts
    while A is between its chunks. Without all buckets taken at A's first chunk, B would take
    y, wait for x, and A's second chunk would close the cycle (deadlock detected)."""
    a, b = writers
    x, y = _two_keys_in_different_buckets()
    errors: list[BaseException] = []
    b_done = threading.Event()

    a.begin()
    a.apply([_set(x, 1, 10)], _begin(1), final=False)

    def replicator_b() -> None:
        try:
            b.begin()
            b.apply([_set(y, 2, 20)], _begin(2), final=False)
            b.apply([_set(x, 2, 20)], _begin(2), final=True)
            b.commit(Lsn(0x2000), T0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            b_done.set()

    t = threading.Thread(target=replicator_b)
    t.start()
    # B is now waiting for the buckets A holds (or, with per-chunk locks, holds y).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not scalar(
            site, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
        time.sleep(0.05)
    assert not b_done.is_set(), "B went through while A held its buckets"
    a.apply([_set(y, 1, 10)], _begin(1), final=True)
    a.commit(Lsn(0x1100), T0)
    t.join(30)
    assert not errors, f"replicator B failed: {errors[0]!r}"
    with connect(site) as conn:
        rows = dict(conn.execute("SELECT id, v FROM item WHERE id IN (%s, %s)", (x, y)).fetchall())
    assert rows == {x: 20, y: 20}, "B's newer versions must stand"


def test_a_final_chunk_takes_only_its_buckets(site: str,
                                              writers: tuple[SiteWriter, SiteWriter]) -> None:
    """Small target transactions (the whole of it known) of two replicators on different keys
    run side by side: neither waits for the other."""
    a, b = writers
    x, y = _two_keys_in_different_buckets()
    a.begin()
    a.apply([_set(x, 1, 10)], _begin(1), final=True)
    held = scalar(site, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
    assert held == 1
    b.begin()
    b.apply([_set(y, 2, 20)], _begin(2), final=True)  # would block if A held every bucket
    b.commit(Lsn(0x2000), T0)
    a.commit(Lsn(0x1100), T0)
    assert scalar(site, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


def test_mixed_changes_of_one_key_in_one_chunk(site: str,
                                               writers: tuple[SiteWriter, SiteWriter]) -> None:
    """Insert, update, delete and insert again of one key, and updates of a hot key, in one
    chunk: decided in order against the state each decision leaves, written as the net
    effect (one read, one write)."""
    a, _b = writers
    changes = [
        Change(Op.INSERT, 0, ITEM, ("50", "1", "1")),
        _set(50, 2, 2),
        Change(Op.DELETE, 2, ITEM, old=("50", None, None), old_is_key=True),
        Change(Op.INSERT, 3, ITEM, ("50", "4", "4")),
        *[_set(3, i, 100 + i) for i in range(20)],
        _set(4, 9, -1),  # an older version than the site's: local wins
    ]
    execute(site, "UPDATE item SET v = 5 WHERE id = 4")
    a.begin()
    a.apply(changes, _begin(1), final=True)
    a.commit(Lsn(0x1100), T0)
    with connect(site) as conn:
        rows: dict[int, Any] = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, qty, v FROM item WHERE id IN (3, 4, 50)").fetchall()}
        tombs = conn.execute("SELECT count(*) FROM cdc_sync.tombstones").fetchone()
        kinds = [r[0] for r in conn.execute("SELECT kind FROM cdc_sync.conflicts").fetchall()]
    assert rows == {3: (19, 119), 4: (0, 5), 50: (4, 4)}
    assert tombs == (0,), "the re-insert removes the tombstone of the delete before it"
    assert kinds == ["update_update"]


def _commit_ts_writer(dsn: str, source: str) -> SiteWriter:
    policy = ResolvedPolicy(table="public.item", strategy="lww", version_column=None,
                            counters=(), merge=None, merge_key=None,
                            tombstone_max_age_seconds=3600.0)
    resolver = make_resolver(policy, site="site")
    opts = SiteOptions(source=source, site="site", resolver_for=lambda _q: resolver,
                       origin=f"cdc_sync:{source}:site")
    return SiteWriter(connect_site(dsn), source, options=opts)


def test_grouped_transactions_keep_each_rows_commit_time(site: str) -> None:
    """Commit-time LWW with two source transactions (t1: key 1, t5: key 2) in one target
    transaction, stamped t5 at commit: key 1 is still dated t1 (`cdc_sync.row_versions`), so
    another office's write of key 1 at t3 wins. (Dated by the target commit, it would lose.)"""
    a, b = _commit_ts_writer(site, "a"), _commit_ts_writer(site, "b")
    base = datetime.now(UTC) + timedelta(days=1)  # newer than the site's own rows
    try:
        t1, t3, t5 = (TxBegin(n, Lsn(0x1000 + n), base + timedelta(seconds=n), None)
                      for n in (1, 3, 5))
        a.begin()
        a.apply_segments([(t1, [_set(1, 1, 0)]), (t5, [_set(2, 5, 0)])], final=True)
        a.commit(Lsn(0x1005), t5.commit_ts)
        assert scalar(site, "SELECT count(*) FROM cdc_sync.row_versions") == 2
        b.begin()
        b.apply([_set(1, 3, 0), _set(2, 3, 0)], t3, final=True)
        b.commit(Lsn(0x1003), t3.commit_ts)
        with connect(site) as conn:
            rows = dict(conn.execute("SELECT id, qty FROM item WHERE id IN (1, 2)").fetchall())
        assert rows == {1: 3, 2: 5}, "t3 beats key 1's t1 and loses to key 2's t5"
        # A local write since: its own commit time (now) applies, not the recorded one (t3).
        execute(site, "UPDATE item SET qty = 9 WHERE id = 1")
        b.begin()
        b.apply([_set(1, 4, 0)], TxBegin(4, Lsn(0x1004), base - timedelta(hours=1), None),
                final=True)
        b.commit(Lsn(0x1004), base)
        assert scalar(site, "SELECT qty FROM item WHERE id = 1") == 4, \
            "the local write (now) is older than the incoming one (in 23 h)"
    finally:
        a.conn.close()
        b.conn.close()


def test_row_versions_only_while_another_source_applies(site: str) -> None:
    """Alone in the site, a commit-time LWW replicator writes no row versions: every row it
    meets was written by itself (its stream is ordered) or locally (dated by its own commit).
    Once a second source is registered, its next target transaction writes them."""
    a = _commit_ts_writer(site, "a")
    base = datetime.now(UTC) + timedelta(days=1)
    try:
        t1, t2, t5, t6 = (TxBegin(n, Lsn(0x1000 + n), base + timedelta(seconds=n), None)
                          for n in (1, 2, 5, 6))
        a.begin()
        a.apply_segments([(t1, [_set(1, 1, 0)]), (t2, [_set(2, 2, 0)])], final=True)
        a.commit(Lsn(0x1002), t2.commit_ts)
        assert scalar(site, "SELECT count(*) FROM cdc_sync.row_versions") == 0
        assert scalar(site, "SELECT array_agg(source) FROM cdc_sync.sources") == ["a"]
        with connect(site) as conn:
            register_source(conn, "b")
        a.begin()
        a.apply_segments([(t5, [_set(1, 5, 0)]), (t6, [_set(2, 6, 0)])], final=True)
        a.commit(Lsn(0x1006), t6.commit_ts)
        assert scalar(site, "SELECT count(*) FROM cdc_sync.row_versions") == 2
    finally:
        a.conn.close()


def test_a_registration_waits_for_resolving_transactions_in_flight(site: str) -> None:
    """A target transaction that read the registry without the new source holds it shared:
    the registration waits for its commit, so no row written without its version can meet
    a change of the new source (whose slot is made after it registered)."""
    a = _commit_ts_writer(site, "a")
    done = threading.Event()
    errors: list[BaseException] = []

    def register() -> None:
        try:
            with connect(site) as conn:
                register_source(conn, "b")
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    try:
        a.begin()
        a.apply([_set(1, 1, 0)], _begin(1), final=False)
        t = threading.Thread(target=register)
        t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not scalar(
                site, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND NOT granted"):
            time.sleep(0.05)
        assert not done.is_set(), "the registration went through a transaction in flight"
        a.apply([_set(2, 2, 0)], _begin(1), final=True)
        a.commit(Lsn(0x1100), _begin(1).commit_ts)
        t.join(30)
        assert done.is_set() and not errors, errors
        assert scalar(site, "SELECT count(*) FROM cdc_sync.row_versions") == 0
        assert scalar(site, "SELECT count(*) FROM cdc_sync.sources") == 2
    finally:
        a.conn.close()

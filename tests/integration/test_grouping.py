"""Grouping small transactions never holds a complete one back when the source is idle.

A site worker groups consecutive small source transactions into one target transaction while
more are queued. A `Keepalive` says the source has sent everything: a group still open then
commits at once. (It used to stay open for `group_max_seconds` whenever the walsender's
keepalive was queued behind the commit, adding 0.5 s to the last transaction of every burst.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from cdc_sync.changes import Change, Op, Table, TxBegin, TxChanges, TxCommit
from cdc_sync.protocol import Lsn, ReplicaIdentity
from cdc_sync.sinks.schema import migrate_site
from cdc_sync.sinks.worker import ItemBatch, Keepalive, SiteWorker, WorkItem

from .conftest import Env
from .helpers import execute, scalar, wait_for

T = Table(16384, "public", "t", ("id", "v"), (23, 25), (-1, -1), (0,), ReplicaIdentity.DEFAULT)


def _queue_at_once(worker: SiteWorker, items: list[WorkItem]) -> None:
    """Queue `items` so the worker sees them all queued when it takes the first."""
    q = worker.queue
    with q.mutex:
        q.queue.extend(items)
        q.unfinished_tasks += len(items)
        q.not_empty.notify()


def _transactions(now: datetime, changes: Callable[[int], tuple[Change, ...]], *,
                  keepalives: bool = False) -> list[WorkItem]:
    """Three one-chunk transactions n = 0, 1, 2 (commit LSN 0x1000 * (n + 1)), each with
    `changes(n)`, and with `keepalives` each followed by a keepalive 0x800 further."""
    items: list[WorkItem] = []
    for n in range(3):
        base = 0x1000 * (n + 1)
        items += [TxBegin(700 + n, Lsn(base), now, None), TxChanges(changes(n)),
                  TxCommit(Lsn(base), Lsn(base + 8), now)]
        if keepalives:
            items.append(Keepalive(Lsn(base + 0x800)))
    return items


def test_a_keepalive_behind_a_commit_commits_the_group_at_once(env: Env) -> None:
    site = env.sites[0]
    migrate_site(site)
    execute(site, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    worker = SiteWorker("a", site, "hq", group_max_seconds=60.0)
    worker.start()
    try:
        assert worker.ready.wait(30)
        now = datetime.now(UTC)
        insert = Change(Op.INSERT, 0, T, ("1", "a"))
        started = time.monotonic()
        _queue_at_once(worker, [
            TxBegin(700, Lsn(0x1000), now, None),
            TxChanges((insert,)),
            TxCommit(Lsn(0x1000), Lsn(0x1008), now),
            Keepalive(Lsn(0x2000)),
        ])
        wait_for(lambda: scalar(site, "SELECT count(*) FROM t") == 1, 20,
                 "the grouped transaction to commit")
        assert time.monotonic() - started < 10, "held back until group_max_seconds"
        assert worker.durable_lsn == Lsn(0x2000)
    finally:
        worker.stop()
        worker.join(30)


def test_keepalives_between_queued_transactions_do_not_split_the_group(env: Env) -> None:
    """A keepalive also stands for a transaction the pipeline skipped (another office's,
    carrying a replication origin: in a mesh, two transactions in three). With more already
    queued behind it, it must not commit the open group: the three transactions below, each
    followed by such a keepalive, are applied in one target transaction (one xmin). Splitting
    there made every target transaction one to eight changes and the three-office mesh fall
    seconds behind at 200 transactions/s per office."""
    site = env.sites[0]
    migrate_site(site)
    execute(site, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    worker = SiteWorker("a", site, "hq", group_max_seconds=60.0)
    worker.start()
    try:
        assert worker.ready.wait(30)
        now = datetime.now(UTC)
        items = _transactions(now, lambda n: (Change(Op.INSERT, 0, T, (str(n), "x")),),
                              keepalives=True)
        _queue_at_once(worker, items)
        wait_for(lambda: scalar(site, "SELECT count(*) FROM t") == 3, 20,
                 "the grouped transactions to commit")
        assert scalar(site, "SELECT count(DISTINCT xmin::text) FROM t") == 1, \
            "a keepalive with more queued behind it split the group"
        wait_for(lambda: worker.durable_lsn == Lsn(0x3800), 20, "the last keepalive to count")
    finally:
        worker.stop()
        worker.join(30)


def test_a_batch_is_taken_item_by_item_in_order_and_grouped(env: Env) -> None:
    """`put(ItemBatch)`: the items of one read from the source as one queue entry. The worker
    takes them in order, counts the rest of the batch as queued (so the three transactions
    below share one target transaction, one xmin) and frees the batch's room at once."""
    site = env.sites[0]
    migrate_site(site)
    execute(site, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    worker = SiteWorker("a", site, "hq", group_max_seconds=60.0, queue_changes=2)
    worker.start()
    try:
        assert worker.ready.wait(30)
        now = datetime.now(UTC)
        items = _transactions(now, lambda n: (Change(Op.INSERT, 0, T, (str(n), "x")),
                                              Change(Op.UPDATE, 1, T, (str(n), f"v{n}"))))
        items.append(Keepalive(Lsn(0x9000)))
        batch = ItemBatch.of(items)
        assert batch.changes == 6
        # more changes than queue_changes: an empty queue still takes it whole
        assert worker.put(batch, timeout=5)
        wait_for(lambda: worker.durable_lsn == Lsn(0x9000), 20, "the batch to be applied")
        assert scalar(site, "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t") \
            == "0=v0,1=v1,2=v2"
        assert scalar(site, "SELECT count(DISTINCT xmin::text) FROM t") == 1
        assert worker.idle()
        assert worker.put(ItemBatch.of([TxBegin(800, Lsn(0xA000), now, None)]), timeout=5)
    finally:
        worker.stop()
        worker.join(30)

"""Large transactions streamed while in progress (protocol 2, `streaming 'on'`).

With `decoding_work_mem = "64kB"` the server streams a transaction of a few thousand rows long
before it commits; the sites apply it as it arrives, in a target transaction of its own that
commits with the source's commit. Checked here: nothing is visible on a site before the source
commits; subtransaction rollbacks and aborted transactions leave nothing; small transactions
committed meanwhile keep their order; a replicator stopped mid-stream converges when it comes
back; a lock wait between our own connections falls back to replay without streaming.

PostgreSQL 15 hides the origin of streamed transactions, so the pipeline streams there only on
sources without replication origins, or with `forward_origins`. The sites of these tests live
on the source's cluster, whose origins they create: the tests set `forward_origins` so that both
versions stream.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.sinks import worker as worker_module

from .conftest import Env
from .helpers import (
    assert_converged,
    connect,
    execute,
    replicating,
    running_pipeline,
    scalar,
    wait_for,
)

ROWS = "CREATE TABLE big (id int PRIMARY KEY, grp int NOT NULL, payload text)"


def stream_settings(env: Env, **source: Any) -> Settings:
    data = env.settings_dict()
    data["source"].update({"decoding_work_mem": "64kB", "forward_origins": True, **source})
    return settings_from_dict(data)


def streaming_open(pipe: Any) -> bool:
    return all(w.open_streams > 0 for w in pipe.workers)


def test_large_transaction_applies_while_streaming_and_shows_only_at_commit(env: Env) -> None:
    execute(env.source, ROWS)
    settings = stream_settings(env)
    with replicating(settings) as pipe:
        wait_for(lambda: pipe.streaming, 20, "the stream session to start")
        with connect(env.source, autocommit=False) as src:
            src.execute("INSERT INTO big SELECT g, g % 7, md5(g::text) FROM generate_series(1, 20000) g")
            src.execute("UPDATE big SET payload = payload || '!' WHERE grp = 3")
            wait_for(lambda: streaming_open(pipe), 30, "the sites to apply the streamed transaction")
            # Applied on the sites, but in their own open transaction: not visible yet.
            time.sleep(0.5)
            for site in env.sites:
                assert scalar(site, "SELECT count(*) FROM big") == 0
            src.commit()
        assert_converged(settings, pipe, timeout=60, min_rows=20000)
        assert all(w.open_streams == 0 for w in pipe.workers)


def test_subtransaction_rollbacks_and_aborted_transactions_leave_nothing(env: Env) -> None:
    execute(env.source, ROWS, "INSERT INTO big SELECT g, 0, 'old' FROM generate_series(1, 3000) g")
    settings = stream_settings(env)
    with replicating(settings) as pipe:
        with connect(env.source, autocommit=False) as src:
            src.execute("INSERT INTO big SELECT g, 1, 'top' FROM generate_series(10001, 15000) g")
            src.execute("SAVEPOINT a")
            src.execute("INSERT INTO big SELECT g, 2, 'rolled back' FROM generate_series(20001, 25000) g")
            src.execute("UPDATE big SET payload = 'rolled back too' WHERE id <= 1000")
            src.execute("SAVEPOINT a_inner")
            src.execute("DELETE FROM big WHERE id BETWEEN 1001 AND 2000")
            src.execute("ROLLBACK TO SAVEPOINT a")
            src.execute("SAVEPOINT b")
            src.execute("UPDATE big SET payload = 'kept' WHERE id BETWEEN 2001 AND 2500")
            src.execute("SAVEPOINT c")
            src.execute("INSERT INTO big SELECT g, 3, 'nested' FROM generate_series(30001, 34000) g")
            src.execute("RELEASE SAVEPOINT c")
            src.execute("RELEASE SAVEPOINT b")
            src.execute("SAVEPOINT d")
            src.execute("DELETE FROM big WHERE id BETWEEN 2501 AND 2600")
            src.execute("ROLLBACK TO SAVEPOINT d")
            src.commit()
        with connect(env.source, autocommit=False) as src:
            src.execute("INSERT INTO big SELECT g, 9, 'aborted' FROM generate_series(40001, 50000) g")
            src.execute("UPDATE big SET payload = 'aborted' WHERE grp = 0")
            wait_for(lambda: streaming_open(pipe), 30, "the aborted transaction to stream")
            src.rollback()
        assert_converged(settings, pipe, timeout=60, min_rows=12000)
        for site in env.sites:
            assert scalar(site, "SELECT count(*) FROM big WHERE payload LIKE '%rolled back%' "
                                "OR payload = 'aborted' OR grp = 9") == 0
            assert scalar(site, "SELECT count(*) FROM big WHERE payload = 'kept'") == 500
            assert scalar(site, "SELECT count(*) FROM big WHERE grp = 3") == 4000
        wait_for(lambda: all(w.open_streams == 0 for w in pipe.workers), 10,
                 "the aborted stream to be rolled back")


def test_small_transactions_committed_meanwhile_keep_their_order(env: Env) -> None:
    execute(env.source, ROWS, "CREATE TABLE small (id int PRIMARY KEY, n int NOT NULL)")
    settings = stream_settings(env)
    with replicating(settings) as pipe:
        with connect(env.source, autocommit=False) as big, connect(env.source) as small:
            big.execute("INSERT INTO big SELECT g, 1, 'big' FROM generate_series(1, 8000) g")
            for i in range(1, 41):
                small.execute("INSERT INTO big VALUES (%s, 2, 'small')", (100_000 + i,))
                small.execute("INSERT INTO small VALUES (%s, 0)", (i,))
                if i % 10 == 0:
                    big.execute("INSERT INTO big SELECT g, 1, 'big' FROM generate_series(%s::int, %s::int) g",
                                (i * 1000 + 8001, i * 1000 + 8999))
            wait_for(lambda: streaming_open(pipe), 30, "the big transaction to stream")
            # The big transaction now takes rows the small ones committed: it must apply
            # after them on the sites, as at the source.
            big.execute("UPDATE big SET payload = 'big saw small' WHERE grp = 2")
            big.execute("UPDATE small SET n = n + 1")
            small.execute("UPDATE small SET n = -1 WHERE id = 0")  # touches nothing
            big.commit()
            small.execute("UPDATE small SET n = n * 10 WHERE id <= 20")  # after the big one
        assert_converged(settings, pipe, timeout=60)
        for site in env.sites:
            assert scalar(site, "SELECT count(*) FROM big WHERE payload = 'big saw small'") == 40
            assert scalar(site, "SELECT sum(n) FROM small") == 20 * 10 + 20


def test_replicator_stopped_mid_stream_converges_when_back(env: Env) -> None:
    execute(env.source, ROWS)
    settings = stream_settings(env)
    with connect(env.source, autocommit=False) as src:
        with replicating(settings) as pipe:
            src.execute("INSERT INTO big SELECT g, 1, 'x' FROM generate_series(1, 10000) g")
            wait_for(lambda: streaming_open(pipe), 30, "the transaction to stream")
            # leaving the block stops the pipeline with the stream open: it is rolled back
        for site in env.sites:
            assert scalar(site, "SELECT count(*) FROM big") == 0
        with running_pipeline(settings) as pipe:
            src.execute("INSERT INTO big SELECT g, 2, 'y' FROM generate_series(10001, 20000) g")
            src.commit()
            assert_converged(settings, pipe, timeout=60, min_rows=20000)
            for site in env.sites:
                assert scalar(site, "SELECT count(*) FROM cdc_sync.progress") == 1


def test_lock_wait_on_our_own_streamed_transaction_falls_back_to_replay(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # A unique index only the sites have: the small transaction's row waits, on the site, for
    # the streamed transaction that holds the same value and cannot commit before it.
    monkeypatch.setattr(worker_module, "STREAM_LOCK_TIMEOUT_MS", 300)
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, code int)")
    settings = stream_settings(env)
    with replicating(settings) as pipe:
        for site in env.sites:
            execute(site, "CREATE UNIQUE INDEX t_code ON t (code)")
        with connect(env.source, autocommit=False) as big:
            big.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 8000) g")
            wait_for(lambda: streaming_open(pipe), 30, "the big transaction to stream")
            execute(env.source, "INSERT INTO t VALUES (100000, 5)")
            wait_for(lambda: pipe._no_stream_until > 0, 30, "the fallback to replay without streaming")
            big.commit()
        # The small transaction came first: it holds code 5; the big one's row with code 5 is
        # a dead letter on each site, every other row applied.
        for site in env.sites:
            wait_for(lambda s=site: scalar(s, "SELECT count(*) FROM t") == 8000, 60,
                     "the replay to apply both transactions")
            assert scalar(site, "SELECT id FROM t WHERE code = 5") == 100000
            assert scalar(site, "SELECT count(*) FROM cdc_sync.dead_letters") == 1
        assert not pipe.streaming


def test_streaming_can_be_turned_off(env: Env) -> None:
    execute(env.source, ROWS)
    settings = stream_settings(env, streaming=False)
    seen: list[int] = []
    with replicating(settings) as pipe:
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.extend(w.open_streams for w in pipe.workers)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            execute(env.source, "INSERT INTO big SELECT g, 1, 'x' FROM generate_series(1, 10000) g")
            assert_converged(settings, pipe, timeout=60, min_rows=10000)
        finally:
            stop.set()
            watcher.join()
        assert not pipe.streaming
        assert not any(seen)


@pytest.mark.parametrize("work_mem, streamed", [("64kB", True), ("64MB", False)])
def test_decoding_work_mem_sets_when_the_server_streams(env: Env, work_mem: str,
                                                        streamed: bool) -> None:
    execute(env.source, ROWS)
    settings = stream_settings(env, decoding_work_mem=work_mem)
    with replicating(settings) as pipe:
        execute(env.source, "INSERT INTO big SELECT g, 1, 'x' FROM generate_series(1, 5000) g")
        assert_converged(settings, pipe, timeout=60, min_rows=5000)
        # The server's own account of the slot (its statistics are flushed asynchronously).
        query = ("SELECT stream_txns, total_txns FROM pg_stat_replication_slots "
                 "WHERE slot_name = %s")
        wait_for(lambda: (scalar(env.source, query.replace("stream_txns, ", ""),
                                 [settings.source.slot]) or 0) > 0, 20, "slot statistics")
        assert (scalar(env.source, query.replace(", total_txns", ""),
                       [settings.source.slot]) > 0) is streamed

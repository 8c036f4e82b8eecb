"""Large transactions with conflict resolution on: streamed by the server, spooled once by the
pipeline, resolved and applied at commit (as native `streaming = on` does).

Checked here, on PG15 and PG16: the server streams the transaction (its slot statistics count a
streamed transaction and no spilled one: nothing piles up in the source's `pg_replslot`), the
pipeline holds it before the source commits and no site shows any of it; at commit the sites
apply it through the resolver (a row a site changed later keeps the site's version, and the
conflict is logged), with rolled-back subtransactions left out; an aborted streamed transaction
leaves nothing; a replicator stopped while it holds an open spooled transaction converges once
back (the server streams it again from its start).
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from cdc_sync.config import Settings, settings_from_dict

from .conftest import Env
from .helpers import (
    assert_converged,
    connect,
    execute,
    replicating,
    running_pipeline,
    scalar,
    wait_for,
    wait_until_caught_up,
)

TABLE = "CREATE TABLE g (id int PRIMARY KEY, amount int NOT NULL, ver bigint NOT NULL)"
LWW: dict[str, Any] = {"strategy": "lww", "version_column": "ver"}


def spool_settings(env: Env, **source: Any) -> Settings:
    data = env.settings_dict()
    # Sites on the source's own cluster create replication origins there: forward_origins
    # lets PostgreSQL 15 stream anyway (see tests/integration/test_streaming.py).
    data["source"].update({"decoding_work_mem": "64kB", "forward_origins": True, **source})
    data["conflicts"] = LWW
    return settings_from_dict(data)


def spooled(pipe: Any) -> int:
    spool = pipe._spool
    return spool.open_transactions if spool is not None else 0


def slot_stat(env: Env, settings: Settings, column: str) -> int:
    query = sql.SQL("SELECT {} FROM pg_stat_replication_slots WHERE slot_name = %s").format(
        sql.Identifier(column))
    return int(scalar(env.source, query, [settings.source.slot]) or 0)


def rows(dsn: str) -> list[tuple[Any, ...]]:
    with connect(dsn) as conn:
        return list(conn.execute("SELECT id, amount, ver FROM g ORDER BY id").fetchall())


def test_lww_large_transaction_is_streamed_spooled_and_resolved_at_commit(env: Env) -> None:
    execute(env.source, TABLE, "INSERT INTO g SELECT g, g, 1 FROM generate_series(1, 3000) g")
    settings = spool_settings(env)
    with replicating(settings) as pipe:
        assert not pipe.stream_apply and pipe.stream_spool
        wait_for(lambda: pipe.streaming, 20, "the stream session to start")
        assert_converged(settings, pipe, timeout=60, min_rows=3000)
        site_a, site_b = env.sites
        # Berlin changed ten rows after the source's version 1: version 100 beats 5 there.
        execute(site_a, "UPDATE g SET amount = -1, ver = 100 WHERE id <= 10")
        with connect(env.source, autocommit=False) as src:
            src.execute("UPDATE g SET amount = amount + 1, ver = 5")
            src.execute("INSERT INTO g SELECT g, g, 5 FROM generate_series(3001, 20000) g")
            src.execute("SAVEPOINT s")
            src.execute("UPDATE g SET amount = 999999 WHERE id BETWEEN 11 AND 500")
            src.execute("ROLLBACK TO SAVEPOINT s")
            src.execute("DELETE FROM g WHERE id BETWEEN 501 AND 600")
            wait_for(lambda: spooled(pipe) > 0, 30, "the pipeline to spool the open transaction")
            for site in env.sites:
                assert scalar(site, "SELECT count(*) FROM g WHERE ver = 5") == 0
            src.commit()
        wait_until_caught_up(settings, 90, pipeline=pipe)
        expected = rows(env.source)
        assert len(expected) == 19900
        assert rows(site_b) == expected
        local = {r[0]: r for r in rows(site_a)}
        assert [local[i] for i in range(1, 11)] == [(i, -1, 100) for i in range(1, 11)]
        assert [r for r in expected if r[0] > 10] == [local[k] for k in sorted(local) if k > 10]
        assert scalar(site_a, "SELECT count(*) FROM cdc_sync.conflicts "
                              "WHERE outcome = 'local_wins'") >= 10
        assert scalar(site_a, "SELECT count(*) FROM g WHERE amount = 999999") == 0
        assert spooled(pipe) == 0
    # The server's own account: streamed, never spilled to the source's disk.
    wait_for(lambda: slot_stat(env, settings, "total_txns") > 0, 20, "slot statistics")
    assert slot_stat(env, settings, "stream_txns") >= 1
    assert slot_stat(env, settings, "spill_txns") == 0


def test_aborted_spooled_transaction_leaves_nothing(env: Env) -> None:
    execute(env.source, TABLE)
    settings = spool_settings(env)
    with replicating(settings) as pipe:
        with connect(env.source, autocommit=False) as src:
            src.execute("INSERT INTO g SELECT g, 0, 1 FROM generate_series(1, 10000) g")
            wait_for(lambda: spooled(pipe) > 0, 30, "the pipeline to spool the open transaction")
            src.rollback()
        execute(env.source, "INSERT INTO g VALUES (1, 42, 1)")
        assert_converged(settings, pipe, timeout=60, min_rows=1)
        wait_for(lambda: spooled(pipe) == 0, 10, "the aborted transaction to be dropped")
        for site in env.sites:
            assert rows(site) == [(1, 42, 1)]


def test_replicator_stopped_while_spooling_converges_when_back(env: Env) -> None:
    execute(env.source, TABLE)
    settings = spool_settings(env)
    with connect(env.source, autocommit=False) as src:
        with replicating(settings) as pipe:
            src.execute("INSERT INTO g SELECT g, 1, 1 FROM generate_series(1, 10000) g")
            wait_for(lambda: spooled(pipe) > 0, 30, "the pipeline to spool the open transaction")
            # leaving the block stops the pipeline with the transaction open and spooled
        for site in env.sites:
            assert scalar(site, "SELECT count(*) FROM g") == 0
        with running_pipeline(settings) as pipe:
            src.execute("INSERT INTO g SELECT g, 2, 1 FROM generate_series(10001, 20000) g")
            src.commit()
            assert_converged(settings, pipe, timeout=90, min_rows=20000)

"""An idle site worker notices a lost site connection on its own (periodic check), instead of
with the next change: `status` stops showing a dead connection as connected, and the worker is
already reconnected when changes come."""

from __future__ import annotations

from .conftest import Env
from .helpers import (
    assert_converged,
    execute,
    replicating,
    scalar,
    wait_for,
    wait_until_caught_up,
)

MAIN_CONNECTION = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                   "AND application_name = 'cdc_sync:hq'")


def test_idle_worker_reconnects_after_its_connection_is_killed(env: Env) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = env.settings()
    with replicating(settings) as pipe:
        for w in pipe.workers:
            w.idle_check_seconds = 0.3
        execute(env.source, "INSERT INTO t VALUES (1, 'a')")
        wait_until_caught_up(settings, pipeline=pipe)
        site = env.sites[0]
        before = scalar(site, MAIN_CONNECTION)
        assert before is not None
        execute(site, f"SELECT pg_terminate_backend({int(before)})")
        # No change reaches the site meanwhile: only the idle check can find the loss.
        wait_for(lambda: scalar(site, MAIN_CONNECTION) not in (None, before), 20,
                 "the idle worker to reconnect on its own")
        # (the new session shows before the worker has read its progress and says connected)
        wait_for(lambda: pipe.workers[0].connected, 10, "the worker to report connected")
        execute(env.source, "INSERT INTO t VALUES (2, 'b')")
        assert_converged(settings, pipe, timeout=30)

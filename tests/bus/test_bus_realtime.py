"""`RealTimeSync` with `[bus]` subscribes on the bus (issue 15), and capture SIGKILLed in the
middle of a 1M-row transaction (issue 15, item 3).

The subscriber runs no pipeline: capture is a `cdc-sync capture` subprocess, killed while it
publishes the big transaction's chunks and started again. The subscriber gets every event of
its topics once, in commit order, and the sites (applied from the stream afterwards) hold the
keyless 1M-row table once: a transaction published twice would show every row twice.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from integration.conftest import Env
from integration.helpers import (
    assert_same_tables,
    execute,
    slot_row,
    wait_for,
)

from cdc_sync import commands
from cdc_sync.api import ChangeEvent, RealTimeSync
from cdc_sync.bus.applier import BusApplier
from cdc_sync.bus.listener import BusListener

from .conftest import NatsServer
from .test_bus import bus_config, running, stream_state, wait_applied

BIG = 1_000_000


def test_realtime_on_the_bus_through_a_capture_killed_mid_1m_row_transaction(
        env: Env, nats_server: NatsServer, tmp_path: Path) -> None:
    execute(env.source, "CREATE TABLE big (n bigint, payload text)",  # keyless
            "ALTER TABLE big REPLICA IDENTITY FULL",
            "CREATE TABLE events (id bigserial PRIMARY KEY, note text)")
    config, settings = bus_config(env, nats_server, tmp_path)
    commands.init(settings)
    cmd = [sys.executable, "-m", "cdc_sync", "capture", "-c", str(config)]
    log = (tmp_path / "capture.log").open("ab")

    seen: list[tuple[str, str]] = []
    after = threading.Event()

    def record(event: ChangeEvent) -> None:
        seen.append((event.topic, str(event.key["id"]) if event.key else str(event.data)))
        if event.topic == "test.after":
            after.set()

    rts = RealTimeSync(settings)
    rts.subscribe("public.events", record)
    rts.subscribe("test.*", record)
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        with rts:
            listener = rts._pipeline
            assert isinstance(listener, BusListener)
            assert listener.ready.wait(30), "the listener did not reach the bus"
            wait_for(lambda: bool(slot_row(env.source, settings.source.slot)["active"]), 30,
                     "capture to hold the slot")
            execute(env.source, "INSERT INTO events (note) SELECT 'a' FROM generate_series(1, 10)")
            rts.emit_change("test.before", {"n": 1})
            execute(env.source, "INSERT INTO big SELECT g, md5(g::text) "
                                "FROM generate_series(1, 1000000) g")
            wait_for(lambda: stream_state(settings).messages > 20, 120, "chunks in the stream")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # 1M rows make 500 chunks: it died mid-transaction
            assert stream_state(settings).messages < 2 + BIG // 2000
            proc = subprocess.Popen(cmd, stdout=log, stderr=log)
            execute(env.source, "INSERT INTO events (note) SELECT 'b' FROM generate_series(1, 10)")
            rts.emit_change("test.after", {"n": 2})
            assert after.wait(300), "the subscriber never saw the last event"
            assert rts.error is None
        with running(BusApplier(settings)):
            wait_applied(settings, timeout=300)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    topics = [t for t, _ in seen]
    assert topics == (["public.events"] * 10 + ["test.before"] + ["public.events"] * 10
                      + ["test.after"]), topics
    ids = Counter(k for t, k in seen if t == "public.events")
    assert sorted(ids, key=int) == [str(i) for i in range(1, 21)]
    assert set(ids.values()) == {1}, "an event delivered twice"
    assert listener.bad_messages == 0
    assert_same_tables(env.source, env.sites, ["public.big", "public.events"], min_rows=20)

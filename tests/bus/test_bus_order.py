"""The stream holds each source transaction once, in commit order, whatever capture survives.

Capture packs small transactions into one message as they come, so where a pack ends depends
on timing: after a crash the slot sends transactions again that the stream already holds, and
they would be packed differently. `cdc-sync capture` is SIGKILLed several times (at seeded
random moments) under a stream of small transactions and one large one; then every message of
the stream is decoded: each transaction's Begin appears once, in increasing commit order, the
large one's chunks in sequence; and the sites equal the source (a keyless table would show a
second copy). Seeded: `CDC_SYNC_SEED`; the seed is in the assertion messages.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from integration.conftest import Env
from integration.helpers import assert_same_tables, slot_row, sync_point, wait_for

from cdc_sync import commands
from cdc_sync.bus._format import HEADER_CHUNK, HEADER_LAST, decode_body
from cdc_sync.bus.applier import BusApplier
from cdc_sync.bus.client import BusClient
from cdc_sync.protocol import Lsn

from .conftest import NatsServer
from .test_bus import bus_config, running, wait_applied
from .test_bus_faults import TABLES, Writer, _schema

KILLS = 4


def _seed() -> int:
    raw = os.environ.get("CDC_SYNC_SEED")
    if raw == "random":
        return random.SystemRandom().randrange(2**32)
    return int(raw) if raw else 15


def test_capture_killed_again_and_again_publishes_each_transaction_once(
        env: Env, nats_server: NatsServer, tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    why = f"seed {seed} (CDC_SYNC_SEED={seed} reruns it)"
    _schema(env)
    config, settings = bus_config(env, nats_server, tmp_path)
    assert settings.bus is not None
    commands.init(settings)
    cmd = [sys.executable, "-m", "cdc_sync", "capture", "-c", str(config)]
    log = (tmp_path / "capture.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    writer = Writer(env.source, rate=400)
    try:
        for kill in range(KILLS):
            wait_for(lambda: bool(slot_row(env.source, settings.source.slot)["active"]), 30,
                     "capture to hold the slot")
            if kill == 1:  # one large transaction, cut into chunks, among the small ones
                with_big = subprocess.Popen([sys.executable, "-c", (
                    "import psycopg,sys; c=psycopg.connect(sys.argv[1], autocommit=True); "
                    "c.execute(\"INSERT INTO ledger SELECT g, 'big' "
                    "FROM generate_series(1, 30000) g\")"), env.source])
                assert with_big.wait(60) == 0
            time.sleep(rng.uniform(0.3, 2.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        time.sleep(1)
    finally:
        writer.stop()
    try:
        end = sync_point(env.source)

        def confirmed() -> bool:
            row = slot_row(env.source, settings.source.slot)
            return Lsn.parse(row["confirmed_flush_lsn"]) >= end

        wait_for(confirmed, 60, "capture to publish everything")
        client = BusClient(settings.bus, settings.source.name)
        client.connect()
        try:
            last = client.state().last_seq
            consumer = client.consumer(1)
            seen: list[int] = []
            chunks: list[tuple[int, int, bool]] = []
            taken = 0
            while taken < last:
                for msg in consumer.fetch(256, 2.0):
                    taken = msg.seq
                    h = msg.headers
                    chunks.append((msg.seq, int(h[HEADER_CHUNK]), h.get(HEADER_LAST) == "1"))
                    for frame in decode_body(msg.data):
                        if frame[:1] == b"B":
                            seen.append(struct.unpack_from("!Q", frame, 1)[0])
            consumer.close()
        finally:
            client.close()
        assert len(seen) > 1000, f"{why}: only {len(seen)} transactions: not a test"
        assert len(set(seen)) == len(seen), f"{why}: a transaction is in the stream twice"
        assert seen == sorted(seen), f"{why}: transactions out of commit order"
        # a chunk n > 0 follows chunk n - 1 of its transaction directly
        for (_s0, n0, last0), (s1, n1, _l1) in zip(chunks, chunks[1:], strict=False):
            if n1 > 0:
                assert n1 == n0 + 1 and not last0, f"{why}: chunk {n1} at {s1} out of place"
        assert sum(1 for _s, n, _l in chunks if n > 0) >= 10, f"{why}: no large transaction"
        with running(BusApplier(settings)):
            wait_applied(settings, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert_same_tables(env.source, env.sites, TABLES, min_rows=1000)

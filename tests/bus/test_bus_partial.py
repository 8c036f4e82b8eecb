"""A transaction cut short in the stream and sent again whole is applied once (issue 15, item 2).

Capture itself no longer sends a transaction again: restarted, it continues after the
stream's last chunk (`tests/bus/test_bus_order.py`). A stream can still hold a partial
transaction followed by the whole one (written by a capture of format 1, or of other chunk
sizes, that died mid-transaction). The messages are made here with the `Chunker` from
pgoutput messages for the sites' keyless table `t (id int)`, and published as such a capture
would: chunks 0 and 1 of a three-chunk transaction, then all three again under new ids.
Every site must hold each of the transaction's rows once, and the transaction after it.
"""

from __future__ import annotations

import struct

from integration.conftest import Env
from integration.helpers import execute, progress_lsn, scalar, wait_for

from cdc_sync import commands
from cdc_sync.bus._format import HEADER_ID, Chunk, Chunker
from cdc_sync.bus.applier import BusApplier
from cdc_sync.bus.client import BusClient
from cdc_sync.protocol import Lsn

from .conftest import NatsServer
from .test_bus import bus_settings, running

RELID = 70001


def _relation() -> bytes:
    column = struct.pack("!B", 1) + b"id\x00" + struct.pack("!Ii", 23, -1)
    return b"R" + struct.pack("!I", RELID) + b"public\x00t\x00f" + struct.pack("!H", 1) + column


def _insert(n: int) -> bytes:
    text = str(n).encode()
    return (b"I" + struct.pack("!I", RELID) + b"N" + struct.pack("!H", 1) + b"t"
            + struct.pack("!I", len(text)) + text)


def _transaction(commit: int, rows: range) -> list[bytes]:
    return [b"B" + struct.pack("!QQI", commit, 0, 900 + commit % 1000), _relation(),
            *(_insert(n) for n in rows),
            b"C" + struct.pack("!BQQQ", 0, commit, commit + 0x30, 0)]


def _chunks(frames: list[bytes]) -> list[Chunk]:
    chunker = Chunker(drop_origins=True, chunk_rows=10)
    out = [c for f in frames for c in chunker.feed(f)]
    return out + chunker.flush()


def test_a_partial_transaction_sent_again_is_applied_once(env: Env,
                                                          nats_server: NatsServer) -> None:
    execute(env.source, "CREATE TABLE t (id int)",  # keyless: a second copy would show
            "ALTER TABLE t REPLICA IDENTITY FULL")
    settings = bus_settings(env, nats_server)
    assert settings.bus is not None
    commands.init(settings)
    base = int(Lsn.parse(str(scalar(env.source, "SELECT pg_current_wal_lsn()::text"))))
    big = _chunks(_transaction(base + 0x1000, range(1, 26)))  # 3 chunks of 10, 10, 5 rows
    after = _chunks(_transaction(base + 0x2000, range(100, 102)))
    assert [(c.number, c.last) for c in big] == [(0, False), (1, False), (2, True)]
    client = BusClient(settings.bus, settings.source.name)
    client.connect()
    try:
        client.ensure_stream()

        async def publish() -> None:
            stream = [(c, c.msg_id) for c in big[:2]]  # the capture died here
            stream += [(c, c.msg_id + "-again") for c in big]  # the whole transaction again
            stream += [(c, c.msg_id) for c in after]
            for chunk, mid in stream:
                await client._js.publish(client.subject, chunk.body(),
                                         headers={**chunk.headers(), HEADER_ID: mid})

        client._run(publish())
    finally:
        client.close()
    applier = BusApplier(settings)
    with running(applier):
        wait_for(lambda: all((progress_lsn(s.dsn, settings.source.name) or 0)
                             >= Lsn(base + 0x2030) for s in settings.sites), 60,
                 "the sites to apply the stream")
    for site in env.sites:
        assert scalar(site, "SELECT count(*) FROM t") == 27
        assert scalar(site, "SELECT count(DISTINCT id) FROM t") == 27
        assert scalar(site, "SELECT min(id) || '-' || max(id) FROM t") == "1-101"

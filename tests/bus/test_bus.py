"""The bus path on real PostgreSQL and a real `nats-server -js`: capture → JetStream → apply.

Each test ends with every table identical to the source. Exactly once is checked from the
sites' side: a restarted applier applies nothing it already holds (its progress is the truth),
and a capture restarted mid-transaction leaves no duplicate in the sites.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from integration.conftest import Env
from integration.helpers import (
    assert_same_tables,
    connect,
    execute,
    progress_lsn,
    scalar,
    settings_dict,
    slot_row,
    sync_point,
    wait_for,
    write_config,
)

from cdc_sync import commands
from cdc_sync.bus._format import HEADER_CHUNK, HEADER_FORMAT, Chunker
from cdc_sync.bus.applier import BusApplier
from cdc_sync.bus.capture import Capture
from cdc_sync.bus.client import BusClient, BusError, BusState
from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.errors import ConfigError
from cdc_sync.protocol import Lsn

from .conftest import NatsServer, nats_binary


def bus_settings(env: Env, server: NatsServer, **bus: Any) -> Settings:
    data = settings_dict(env.source, env.sites)
    data["bus"] = {"kind": "nats", "url": server.url, **bus}
    return settings_from_dict(data)


def bus_config(env: Env, server: NatsServer, tmp_path: Path) -> tuple[Path, Settings]:
    """A config file for the CLI (`tmp_path/cdc.toml`) and its settings, with `[bus]`."""
    data = settings_dict(env.source, env.sites)
    data["bus"] = {"kind": "nats", "url": server.url}
    return write_config(tmp_path / "cdc.toml", data), settings_from_dict(data)


class Runner:
    """`target.run()` in a thread; `stop()` joins it and re-raises what it raised."""

    def __init__(self, target: Capture | BusApplier) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.target.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.target.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise AssertionError(f"{type(self.target).__name__} failed: {self.error!r}")


@contextmanager
def running(target: Capture | BusApplier) -> Iterator[Capture | BusApplier]:
    r = Runner(target)
    try:
        yield target
    finally:
        r.stop()


def wait_applied(settings: Settings, timeout: float = 60) -> None:
    """Every site's progress passes a marker committed now."""
    target = sync_point(settings.source.dsn)
    wait_for(lambda: all((progress_lsn(s.dsn, settings.source.name) or 0) > target
                         for s in settings.sites), timeout, f"sites to pass {target}")


def stream_state(settings: Settings) -> Any:
    assert settings.bus is not None
    client = BusClient(settings.bus, settings.source.name)
    try:
        client.connect()
        return client.state()
    except BusError:  # not created yet by capture
        return BusState(client.stream, 0, 0, 0, 0)
    finally:
        client.close()


def test_capture_and_apply_converge_and_resume_from_site_progress(
        env: Env, nats_server: NatsServer) -> None:
    execute(env.source, "CREATE TABLE grants (id int PRIMARY KEY, amount numeric, note text)",
            "INSERT INTO grants SELECT g, g * 10, 'n' || g FROM generate_series(1, 100) g")
    settings = bus_settings(env, nats_server)
    commands.init(settings)
    with running(Capture(settings)):
        with running(BusApplier(settings)):
            execute(env.source, "UPDATE grants SET amount = amount + 1 WHERE id % 3 = 0",
                    "DELETE FROM grants WHERE id % 7 = 0",
                    "INSERT INTO grants SELECT g, g, repeat('x', 3000) FROM generate_series(101, 400) g")
            wait_applied(settings)
        assert_same_tables(env.source, env.sites, ["public.grants"], min_rows=300)
        # Restarted, the applier starts from each site's progress: nothing applied twice.
        applier = BusApplier(settings)
        with running(applier):
            time.sleep(2)
            assert [w.applied_changes for w in applier.workers] == [0, 0]
            execute(env.source, "UPDATE grants SET note = 'late' WHERE id = 5")
            wait_applied(settings)
            assert [w.applied_changes for w in applier.workers] == [1, 1]
    assert_same_tables(env.source, env.sites, ["public.grants"])


def test_the_sites_of_one_process_share_one_read_of_the_stream(
        env: Env, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode once, fan out: two sites in one `apply` decode each message once (the
    `SharedFeed`), and both stay in it while they keep pace."""
    from cdc_sync.bus import applier as applier_module

    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = bus_settings(env, nats_server)
    commands.init(settings)
    decoded: list[int] = []
    feed = applier_module._feed

    def counting(assembler: Any, body: bytes) -> Any:
        decoded.append(len(body))
        return feed(assembler, body)

    monkeypatch.setattr(applier_module, "_feed", counting)
    with running(Capture(settings)):
        applier = BusApplier(settings)
        with running(applier):
            with connect(env.source) as conn:
                for i in range(20):
                    conn.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(%s::int, %s::int) g",
                                 (i * 100 + 1, i * 100 + 100))
            wait_applied(settings)
            assert applier.shared is not None
            assert [m.worker.site for m in applier.shared.members] == \
                [s.name for s in settings.sites]
            assert not any(f.is_alive() for f in applier.feeds)  # no site reads on its own
            messages = stream_state(settings).messages
    assert 0 < len(decoded) <= messages, (len(decoded), messages)  # not once per site
    assert_same_tables(env.source, env.sites, ["public.t"], min_rows=2000)


def test_a_down_site_does_not_hold_the_slot(env: Env, nats_server: NatsServer) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = bus_settings(env, nats_server)
    commands.init(settings)
    with running(Capture(settings)) as cap:
        with connect(env.source) as conn:
            for i in range(20):
                conn.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(%s::int, %s::int) g",
                             (i * 500 + 1, (i + 1) * 500))
        target = Lsn.parse(scalar(env.source, "SELECT pg_current_wal_lsn()::text"))

        def confirmed() -> Lsn:
            row = slot_row(env.source, settings.source.slot)
            assert row is not None
            return Lsn.parse(row["confirmed_flush_lsn"])

        # No applier runs at all: the slot is confirmed as JetStream stores the changes.
        wait_for(lambda: confirmed() >= target, 30, "the slot to be confirmed without any site")
        assert isinstance(cap, Capture) and cap.published >= 20
        status = commands.status(settings)
        assert status["bus"]["reachable"] and status["bus"]["messages"] >= 20
        assert [s["pending_messages"] for s in status["bus"]["sites"]] == [
            status["bus"]["messages"]] * 2
    with running(Capture(settings)), running(BusApplier(settings)):
        wait_applied(settings)
    assert_same_tables(env.source, env.sites, ["public.t"], min_rows=10000)


def test_capture_killed_mid_transaction_leaves_nothing_twice(
        env: Env, nats_server: NatsServer, tmp_path: Path) -> None:
    execute(env.source, "CREATE TABLE big (id int PRIMARY KEY, payload text)",
            "CREATE TABLE events (id bigserial PRIMARY KEY, note text)")
    config, settings = bus_config(env, nats_server, tmp_path)
    commands.init(settings)
    cmd = [sys.executable, "-m", "cdc_sync", "capture", "-c", str(config)]
    log = (tmp_path / "capture.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        wait_for(lambda: bool(slot_row(env.source, settings.source.slot)["active"]), 30,
                 "capture to hold the slot")
        execute(env.source, "INSERT INTO big SELECT g, repeat(md5(g::text), 4) "
                            "FROM generate_series(1, 200000) g")
        execute(env.source, "INSERT INTO events (note) SELECT 'e' FROM generate_series(1, 50)")
        # Killed while it publishes the big transaction's chunks.
        wait_for(lambda: stream_state(settings).messages > 3, 60, "chunks in the stream")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # 200k rows make 100 chunks: it died mid-transaction
        assert stream_state(settings).messages < 100
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        with running(BusApplier(settings)):
            wait_applied(settings, timeout=120)
        assert_same_tables(env.source, env.sites, ["public.big", "public.events"], min_rows=50)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_retention_exceeded_shows_needs_resync(env: Env, nats_server: NatsServer) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)")
    settings = bus_settings(env, nats_server, max_age_seconds=2)
    commands.init(settings)
    with running(Capture(settings)):
        with connect(env.source) as conn:
            for i in range(5):
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
        wait_for(lambda: stream_state(settings).last_seq >= 1, 30, "messages in the stream")
        wait_for(lambda: stream_state(settings).first_seq > 1, 30, "retention to discard messages")
        execute(env.source, "INSERT INTO t VALUES (100)")
        wait_for(lambda: stream_state(settings).messages >= 1, 30, "a new message")
        applier = BusApplier(settings, [settings.sites[0].name])
        with running(applier):
            wait_for(lambda: applier.feeds[0].needs_resync, 30, "needs resync")
            assert applier.workers[0].applied_changes == 0  # never silently skipped
            bus = commands.status(settings)["bus"]
            assert bus["sites"][0]["needs_resync"] is True, bus
            assert scalar(env.sites[0], "SELECT count(*) FROM t") == 0
            # init re-copies that site while capture and the applier run; it then follows on
            report = commands.init(settings)
            assert report.copied.get(settings.sites[0].name) == 6
            wait_for(lambda: not applier.feeds[0].needs_resync, 30, "the feed to resume")
            execute(env.source, "INSERT INTO t VALUES (101)")
            wait_for(lambda: scalar(env.sites[0], "SELECT count(*) FROM t") == 7, 30,
                     "the re-copied site to apply new changes")
    assert_same_tables(env.source, [env.sites[0]], ["public.t"])


def test_a_foreign_message_is_skipped_and_counted(env: Env, nats_server: NatsServer) -> None:
    execute(env.source, "CREATE TABLE t (id int PRIMARY KEY)")
    settings = bus_settings(env, nats_server)
    commands.init(settings)
    assert settings.bus is not None
    with running(Capture(settings)):
        applier = BusApplier(settings)
        with running(applier):
            execute(env.source, "INSERT INTO t SELECT generate_series(1, 5)")
            wait_applied(settings)
            client = BusClient(settings.bus, settings.source.name)
            client.connect()

            async def junk() -> None:
                await client._js.publish(client.subject, b"hello")
                # a message of a newer cdc-sync's format
                await client._js.publish(client.subject, b"CDC2...",
                                         headers={HEADER_FORMAT: "9", HEADER_CHUNK: "0"})

            client._run(junk())
            client.close()
            execute(env.source, "INSERT INTO t SELECT generate_series(6, 10)")
            wait_applied(settings)
            assert [f.bad_messages for f in applier.feeds] == [2, 2]
            for feed in applier.feeds:  # met again by a feed that starts over: recorded once
                feed.restart()
            execute(env.source, "INSERT INTO t SELECT generate_series(11, 15)")
            wait_applied(settings)
    assert_same_tables(env.source, env.sites, ["public.t"], min_rows=15)
    for site in env.sites:
        with connect(site) as conn:
            rows = conn.execute("SELECT op, row_data->>'seq', error FROM cdc_sync.dead_letters "
                                "ORDER BY id").fetchall()
        assert [r[0] for r in rows] == ["bus_message", "bus_message"]
        seqs = [int(r[1]) for r in rows]
        assert seqs[1] == seqs[0] + 1
        assert f"message {seqs[0]} is not a cdc-sync message" in rows[0][2]
        assert "has format '9', this cdc-sync reads '2'" in rows[1][2]
    reports = commands.retry_dead_letters(settings)
    assert all(len(r.resolved) == 2 and not r.failed for r in reports.values())


def test_bad_credentials_and_a_foreign_stream_are_one_line(env: Env, tmp_path: Path) -> None:
    binary = nats_binary()
    if binary is None:
        pytest.skip("no nats-server")
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(binary, store, "--user", "cdc", "--pass", "right-pass")
    server.start()
    try:
        wrong = bus_settings(env, server, user="cdc", password="wrong-pass")
        assert wrong.bus is not None
        began = time.monotonic()
        with pytest.raises(BusError) as info:
            BusClient(wrong.bus, "hq").connect()
        assert time.monotonic() - began < 12
        text = str(info.value)
        assert "\n" not in text and "uthorization" in text and server.url in text
        assert "wrong-pass" not in text
        # A stream of that name exists for something else.
        settings = bus_settings(env, server, user="cdc", password="right-pass",
                                stream="SHARED")
        assert settings.bus is not None
        commands.init(settings)
        client = BusClient(settings.bus, settings.source.name)
        client.connect()

        async def other() -> None:
            await client._js.add_stream(name="SHARED", subjects=["orders.>"])

        client._run(other())
        client.close()
        config = write_config(tmp_path / "cdc.toml",
                              {**settings_dict(env.source, env.sites),
                               "bus": {"kind": "nats", "url": server.url, "user": "cdc",
                                       "password": "right-pass", "stream": "SHARED"}})
        done = subprocess.run([sys.executable, "-m", "cdc_sync", "capture", "-c", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "stream SHARED exists with subjects ['orders.>']" in lines[0]
        assert "set [bus] stream to another name" in lines[0]
        assert "right-pass" not in done.stderr
    finally:
        server.stop()


def test_a_stream_of_ours_with_other_settings(env: Env, nats_server: NatsServer,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Memory storage or a retention that drops read messages: refused, one line naming the
    fix. Other retention limits than `[bus]` says: capture brings them to the file's."""
    from nats.js import api

    def create(name: str, **config: Any) -> None:
        client = BusClient(bus_settings(env, nats_server).bus, "x")  # type: ignore[arg-type]
        client.connect()
        try:
            subject = f"cdc.{name.lower()}.>"
            client._run(client._js.add_stream(name=name, subjects=[subject], **config))
        finally:
            client.close()

    create("MEM", storage=api.StorageType.MEMORY)
    create("WORK", retention=api.RetentionPolicy.WORK_QUEUE)
    create("OLDAGE", max_age=3600.0)
    for source, stream, why in (("mem", "MEM", "keeps its messages in memory storage"),
                                ("work", "WORK", "has workqueue retention")):
        bus = bus_settings(env, nats_server, stream=stream).bus
        assert bus is not None
        client = BusClient(bus, source)
        client.connect()
        try:
            with pytest.raises(BusError) as info:
                client.ensure_stream()
        finally:
            client.close()
        assert why in str(info.value) and "\n" not in str(info.value)
        assert "set [bus] stream to another name, or delete that stream" in str(info.value)
    bus = bus_settings(env, nats_server, stream="OLDAGE", max_age_seconds=60,
                       max_bytes=1 << 30).bus
    assert bus is not None
    client = BusClient(bus, "oldage")
    client.connect()
    try:
        client.ensure_stream(adjust=False)  # a reader only checks
        info = client._run(client._js.stream_info("OLDAGE"))
        assert info.config.max_age == 3600.0
        with caplog.at_level("INFO", logger="cdc_sync.bus.client"):
            client.ensure_stream()
        info = client._run(client._js.stream_info("OLDAGE"))
        assert info.config.max_age == 60.0 and info.config.max_bytes == 1 << 30
        assert "stream OLDAGE now has max_bytes 1073741824, max_age 60.0" in caplog.text
        caplog.clear()
        with caplog.at_level("INFO", logger="cdc_sync.bus.client"):
            client.ensure_stream()  # already so: nothing changes, nothing said
        assert "now has" not in caplog.text
    finally:
        client.close()


def test_an_unreachable_bus_is_one_line(env: Env) -> None:
    data = settings_dict(env.source, env.sites)
    data["bus"] = {"kind": "nats", "url": "nats://127.0.0.1:1"}
    settings = settings_from_dict(data)
    client = BusClient(settings.bus, "hq")  # type: ignore[arg-type]
    began = time.monotonic()
    with pytest.raises(BusError) as info:
        client.connect()
    client.close()
    assert time.monotonic() - began < 15
    assert "\n" not in str(info.value) and "127.0.0.1:1" in str(info.value)
    with pytest.raises(ConfigError, match='no site named "nowhere"'):
        commands.apply(settings, ["nowhere"], install_signals=False)


def test_chunking_is_deterministic() -> None:
    import struct
    begin = b"B" + struct.pack("!QQI", 0x1000, 0, 7)
    rel = b"R" + struct.pack("!I", 42) + b"public\x00t\x00d" + struct.pack("!H", 0)
    rows = [b"I" + struct.pack("!I", 42) + b"N" + struct.pack("!H", 0) for _ in range(25)]
    commit = b"C" + struct.pack("!BQQQ", 0, 0x1000, 0x1010, 0)

    def cut(with_rel_at: int) -> list[tuple[str, bool, int]]:
        c = Chunker(drop_origins=True, chunk_rows=10)
        if with_rel_at < 0:
            c.feed(rel)  # sent in an earlier transaction of the session
        out = c.feed(begin)
        for i, r in enumerate(rows):
            if i == with_rel_at:
                out += c.feed(rel)
            out += c.feed(r)
        out += c.feed(commit)
        assert rel in out[0].frames  # every chunk 0 can be decoded on its own
        return [(ch.msg_id, ch.last, sum(f[:1] == b"I" for f in ch.frames)) for ch in out]

    first = cut(-1)
    assert first == cut(0) == [("1000:0", False, 10), ("1000:1", False, 10), ("1000:2", True, 5)]

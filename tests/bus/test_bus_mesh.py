"""Multi-directional over the bus (issue 15, item 4): three offices, each with its own capture
and stream on one NATS JetStream server, each office applying the other two offices' streams
(`cdc-sync run` with `[bus]`: capture and appliers in one process per office). The
convergence checker of `tests/multi` runs unchanged on top: writers at all three offices on the
same rows, a replicator SIGKILLed and an office's server restarted mid-run; then identical
offices, every key holding its last write, counters equal to the sum of their increments,
nothing looping. Seeded like the in-process cases (`CDC_SYNC_SEED`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from multi.checker import CHECKER_DDL, Scenario, chosen_seed, run, soak_seconds
from multi.conftest import offices  # noqa: F401  (the fixture)
from multi.helpers import Office

from cdc_sync.bus.client import BusClient
from cdc_sync.config import BusSettings
from cdc_sync.embedded import ServerBinaries

from .conftest import NatsServer

OFFICES = ("berlin", "tokyo", "washington")


def test_offices_converge_through_the_bus(offices: Callable[..., list[Office]],  # noqa: F811
                                          server_binaries: ServerBinaries,
                                          nats_server: NatsServer, tmp_path: Path) -> None:
    """Commit-time LWW (the case that needs each row's source time) with faults."""
    seed = chosen_seed(server_binaries.major * 100 + 7)
    sc = Scenario("commit", "default", seed, seconds=soak_seconds(12.0), bus=nats_server.url)
    run(sc, offices(OFFICES, CHECKER_DDL), tmp_path)
    # It went through the bus: every office's transactions are in its own stream (packed:
    # consecutive small transactions share a message, so fewer messages than transactions).
    for name in OFFICES:
        client = BusClient(BusSettings(kind="nats", url=nats_server.url), name)
        try:
            client.connect()
            assert client.state().messages > 10, f"stream of {name}"
        finally:
            client.close()

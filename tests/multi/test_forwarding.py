"""Replication origins: what a replicator passes on of the writes another replicator applied.

A chain berlin -> tokyo -> washington: berlin's replicator has berlin as source and tokyo as
site; tokyo's has tokyo as source and washington as site. berlin's writes reach tokyo tagged
with the replication origin `cdc_sync:berlin:tokyo`. tokyo's replicator drops such
transactions (PG15: the Origin message in the stream; PG16: `origin 'none'` on
START_REPLICATION) unless `[source] forward_origins = true`. Runs on both versions.
"""

from __future__ import annotations

from collections.abc import Callable

from cdc_sync.embedded import ServerBinaries

from .helpers import Mesh, Office

A, B, C = "berlin", "tokyo", "washington"

MakeOffices = Callable[..., list[Office]]


def ids(o: Office) -> list[int]:
    return list(o.scalar("SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM grants"))


def test_forward_origins_chain(offices: MakeOffices, server_binaries: ServerBinaries) -> None:
    made = offices([A, B, C])
    m = Mesh(made, links={A: [B], B: [C]}).init().start()
    try:
        # tokyo without forward_origins: berlin's write stops at tokyo, tokyo's own goes on.
        m.office(A).execute("INSERT INTO grants (id, writer) VALUES (1, 'berlin')")
        m.office(B).execute("INSERT INTO grants (id, writer) VALUES (2, 'tokyo')")
        m.caught_up(A)
        m.caught_up(B)  # tokyo's replicator has seen (and skipped) berlin's applied write
        assert ids(m.office(B)) == [1, 2]
        assert ids(m.office(C)) == [2]
        assert m.office(B).scalar(
            "SELECT roname FROM pg_replication_origin WHERE roname LIKE 'cdc_sync:%'") \
            == "cdc_sync:berlin:tokyo"
        m.stop()

        # tokyo with forward_origins = true: berlin's next write reaches washington.
        m = Mesh(made, links={A: [B], B: [C]}, forward={B: True}).start()
        m.office(A).execute("INSERT INTO grants (id, writer) VALUES (3, 'berlin')")
        m.office(A).execute("UPDATE grants SET writer = 'berlin again' WHERE id = 1")
        m.caught_up(A)
        m.caught_up(B)
        assert ids(m.office(B)) == [1, 2, 3]
        assert ids(m.office(C)) == [1, 2, 3]  # 1 arrives as an update of a missing row
        assert m.office(C).scalar("SELECT writer FROM grants WHERE id = 1") == "berlin again"
        assert m.office(C).scalar("SELECT writer FROM grants WHERE id = 3") == "berlin"
        m.stop()
    finally:
        m.close()

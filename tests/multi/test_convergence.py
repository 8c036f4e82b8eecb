"""Three offices converge while writers at all three hammer the same rows and faults hit.

The machinery and what is checked are in `tests/multi/checker.py`: two writers per office on
40 grant keys and five counters for 12 s, one replicator SIGKILLed and one office's server
restarted mid-run, a last write per key 60 ms apart; then identical offices, every key holding
its last write by the README's ordering key (and every clear last write, deletes included),
counters equal to the sum of their increments, nothing looping. The per-column case
(`merge_columns`) checks each column against the latest write that set it.

Each case runs on PG15 and PG16 with its own seed (`CDC_SYNC_SEED` overrides it, "random"
picks one; the seed is printed and named in every failure); REPLICA IDENTITY alternates
between the server versions so each strategy meets both. `CDC_SYNC_SOAK_SECONDS=600` makes it
a soak run (faults every 30 s), as `benchmarks/README.md` describes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from cdc_sync.embedded import ServerBinaries

from .checker import CHECKER_DDL, Scenario, chosen_seed, run, soak_seconds
from .helpers import Office

OFFICES = ("berlin", "tokyo", "washington")


@pytest.mark.parametrize("strategy", ["version", "commit"])
def test_offices_converge_under_faults(offices: Callable[..., list[Office]],
                                       server_binaries: ServerBinaries, tmp_path: Path,
                                       strategy: Literal["version", "commit"]) -> None:
    """lww on the `updated_at` version column, or on commit timestamps."""
    major = server_binaries.major
    identity: Literal["default", "full"] = (
        "full" if (strategy == "version") == (major == 15) else "default")
    seed = chosen_seed(major * 100 + (1 if strategy == "version" else 2))
    sc = Scenario(strategy, identity, seed, seconds=soak_seconds(12.0))
    run(sc, offices(OFFICES, CHECKER_DDL), tmp_path)


def test_offices_converge_column_by_column_under_faults(
        offices: Callable[..., list[Office]], server_binaries: ServerBinaries,
        tmp_path: Path) -> None:
    """merge_columns: writers update random subsets of a grant's columns at three offices;
    every column ends with its own last writer's value at every office."""
    seed = chosen_seed(server_binaries.major * 100 + 3)
    sc = Scenario("columns", "full", seed, seconds=soak_seconds(12.0))
    run(sc, offices(OFFICES, CHECKER_DDL), tmp_path)

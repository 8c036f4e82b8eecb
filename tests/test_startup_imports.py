"""What the CLI loads at start-up: the commands that only connect (`init`, `status`, …) must
not pay for the applier, the assembler or the pgoutput decoder (they are loaded by `run`), and
the protocol package's lazily loaded names must all resolve."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cdc_sync.protocol as protocol

HEAVY = ("cdc_sync.sinks.site", "cdc_sync.changes", "cdc_sync.protocol._decode",
         "cdc_sync.protocol._messages", "cdc_sync.pipeline")


def test_cli_start_up_loads_neither_applier_nor_decoder() -> None:
    code = ("import sys, cdc_sync.cli, cdc_sync.commands; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == []


def test_every_exported_protocol_name_resolves() -> None:
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None, name
    assert protocol.decode_row.__module__ == "cdc_sync.protocol._decode"
    assert protocol.PG_EPOCH.year == 2000
    assert sorted(dir(protocol)) == sorted(protocol.__all__)
    # only exported names are loaded lazily, not whatever a submodule happens to hold
    with pytest.raises(AttributeError):
        _ = protocol.struct
    with pytest.raises(AttributeError):
        _ = protocol._read_tuple


def test_unknown_protocol_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = protocol.nope

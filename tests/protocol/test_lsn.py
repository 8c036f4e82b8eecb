"""Lsn: PostgreSQL's X/Y notation, both ways."""

from __future__ import annotations

import pytest

from cdc_sync.protocol import INVALID_LSN, Lsn, ProtocolError


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/1A2B3C4", 0x1A2B3C4),
        ("1/0", 1 << 32),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_parse_and_format_round_trip(text: str, value: int) -> None:
    lsn = Lsn.parse(text)
    assert lsn == value and isinstance(lsn, Lsn)
    assert str(lsn) == text
    assert f"{lsn}" == text
    assert "%s" % lsn == text  # noqa: UP031 - logging formats with %s
    assert repr(lsn) == f"Lsn('{text}')"
    assert Lsn.parse(str(Lsn(value))) == value


def test_parse_is_case_insensitive_and_strips_blanks() -> None:
    assert Lsn.parse(" 16/b374d848\n") == Lsn.parse("16/B374D848")
    assert Lsn.parse("00000000/00000001") == 1


@pytest.mark.parametrize(
    "text",
    ["", "0", "/", "0/", "/0", "1/2/3", "G/0", "0/-1", "-1/0", "+1/0", "0x1/0", "1_0/0",
     "1/ 2", "123456789/0", "0/123456789", "0 /0", "１/0"],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ProtocolError, match="not an LSN"):
        Lsn.parse(text)


def test_range_and_constants() -> None:
    assert INVALID_LSN == 0 and str(INVALID_LSN) == "0/0"
    assert Lsn() == 0
    with pytest.raises(ValueError):
        Lsn(-1)
    with pytest.raises(ValueError):
        Lsn(2**64)
    assert Lsn(5) < Lsn(6) and Lsn(5) == 5 and hash(Lsn(5)) == hash(5)

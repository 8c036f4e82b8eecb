"""Packed column parameters (`pack`, `pack_columns`): what they pack round-trips exactly, and
what they cannot pack they refuse (None), so the caller sends binary arrays instead."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import psycopg
import pytest

from cdc_sync.changes import UNCHANGED_TOAST
from cdc_sync.sinks._arrays import DELIMITER, NULL_MARK, pack, pack_columns

TRICKY = ["", " ", "NULL", "null", "\\N", "\\", "\\\\", '"', "'", ",", "{", "}", "{}", "{a,b}",
          '{"x"}', "a,b", "ü", "✓ grüße", "😀", "\t", "\n", "\r\n", "\x7f",
          "a\x1eb", "\x1e\x1e", "\x1e ", " \x1e", "x" * 300, "E'\\x1f'", "()", "[1,2]"]


def unpack(packed: str) -> list[str | None]:
    """What `string_to_array(packed, E'\\x1f', E'\\x1e')` does (for a non-empty string)."""
    return [None if v == NULL_MARK else v for v in packed.split(DELIMITER)]


def random_value(rng: random.Random) -> str | None:
    r = rng.random()
    if r < 0.15:
        return None
    if r < 0.6:
        return rng.choice(TRICKY)
    alphabet = "ab,{}\"'\\ NUL\x1eé✓😀\n"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))


def random_column(rng: random.Random) -> list[str | None]:
    column = [random_value(rng) for _ in range(rng.randint(1, 12))]
    if column == [""]:
        column.append("")
    return [v for v in column if v != NULL_MARK] or [None]


@pytest.mark.parametrize("seed", range(20))
def test_pack_round_trips_random_columns(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        column = random_column(rng)
        packed = pack(column)
        assert packed is not None, column
        assert unpack(packed) == column
        assert pack(tuple(column)) == packed


@pytest.mark.parametrize("column", [
    [None], ["x"], [""] * 2, ["", None], [None, ""], [None, None], ["NULL"], ["a\x1eb"],
    ["\x1e\x1e"], ["", "", ""], TRICKY, [*TRICKY, None],
])
def test_pack_round_trips_edge_columns(column: list[str | None]) -> None:
    packed = pack(column)
    assert packed is not None
    assert unpack(packed) == column


def test_pack_joins_with_the_unit_separator() -> None:
    assert pack(["a", None, "", "b"]) == "a\x1f\x1e\x1f\x1fb"
    assert pack([None]) == "\x1e"


@pytest.mark.parametrize("column", [
    ["a\x1fb"], ["\x1f"], ["x", "\x1f"], [None, "a\x1f"], ["\x1f", None],  # the delimiter
    ["\x1e"], ["a", "\x1e"], [None, "\x1e"], ["\x1e", None],  # exactly the NULL mark
    [""],  # string_to_array('') is an empty array, not one empty string
    [1], ["a", 2], [b"x"], [None, b"x"], ["a", None, 3.5], [UNCHANGED_TOAST], ["a", UNCHANGED_TOAST],
])
def test_pack_refuses_what_it_cannot_carry(column: list[object]) -> None:
    assert pack(column) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(5))
def test_pack_refuses_random_columns_with_a_separator(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        column = random_column(rng)
        i = rng.randrange(len(column))
        bad = rng.choice([DELIMITER, NULL_MARK, f"x{DELIMITER}", f"{DELIMITER}{DELIMITER}"])
        column[i] = bad
        assert pack(column) is None, column


def test_pack_columns() -> None:
    assert pack_columns([]) == []
    assert pack_columns([["1", "2"], [None, "b"], [""] * 2]) == [
        "1\x1f2", "\x1e\x1fb", "\x1f"]
    for bad in (["a\x1fb", "c"], ["\x1e"], [""], [1], [b"x"]):
        for at in range(3):
            columns: list[Sequence[object]] = [["1", "2"], [None, "b"]]
            columns.insert(at, bad)
            assert pack_columns(columns) is None, (at, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("column", [
    ["", None, ""], ["NULL", "null", None, "\\N"], ["a,b", "{c}", '"q"', "\\", " sp ", "'"],
    ["ü✓😀", "a\x1eb", "\x1e\x1e", "\n\t"], [None], ["", ""], ["x"], TRICKY, [*TRICKY, None],
], ids=lambda c: f"{len(c)}-values")
def test_string_to_array_on_the_server_gives_back_the_list(
        column: list[str | None], make_db: Callable[..., str]) -> None:
    packed = pack(column)
    assert packed is not None
    rng = random.Random(7)
    randoms = [random_column(rng) for _ in range(20)]
    with psycopg.connect(make_db("arrays")) as conn:
        row = conn.execute("SELECT string_to_array(%s, E'\\x1f', E'\\x1e')", [packed]).fetchone()
        assert row is not None and row[0] == column
        for rc in randoms:
            p = pack(rc)
            assert p is not None
            row = conn.execute("SELECT string_to_array(%s, E'\\x1f', E'\\x1e')", [p]).fetchone()
            assert row is not None and row[0] == rc

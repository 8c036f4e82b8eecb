"""Column parameters for the set-based statements: each column of a run is one parameter.

Two encodings, both ending as a `text[]` unnested on the site:
- packed (`pack_columns`, the fast path): the column's values joined with the unit separator
  U+001F into one text parameter, split on the site by `string_to_array(%s, E'\\x1f',
  E'\\x1e')`, NULLs written as the record separator U+001E. Joining is one C call per column,
  and the server splits it several times faster than it parses an array literal. It cannot
  carry a value containing U+001F, a value that is exactly U+001E, or a single empty string
  (which `string_to_array` turns into no element): then `pack_columns` returns None.
- binary arrays (`%b::text[]`, psycopg's list dumper): any value; about 1 us per value in
  Python. Used when packing is not possible, and by the resolving path.

Measured on this project's 5000-row runs: psycopg's binary dumper ~1.2 us a value, a packed
column ~0.01 us a value in Python; on the server `string_to_array` + `unnest` took about half
the time of `array_recv` + `unnest`. (A hand-built array literal was also measured: cheap in
Python but the server's `array_in` spends ~1 us per element parsing it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

DELIMITER: Final = "\x1f"
NULL_MARK: Final = "\x1e"


def transpose(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rows of values to one list (array parameter) per column."""
    return [list(col) for col in zip(*rows, strict=True)]


def pack(values: Sequence[str | None]) -> str | None:
    """One column as one delimited string (see the module docstring), or None if it can't be."""
    try:
        joined = DELIMITER.join(values)  # type: ignore[arg-type]  # NULLs: TypeError below
        if NULL_MARK in values:
            return None
    except TypeError:  # NULLs (or a non-text value)
        nulls = values.count(None)
        marked = [NULL_MARK if v is None else v for v in values]
        if marked.count(NULL_MARK) != nulls:
            return None
        try:
            joined = DELIMITER.join(marked)
        except TypeError:
            return None
    if joined.count(DELIMITER) != len(values) - 1 or not joined and len(values) == 1:
        return None
    return joined


def pack_columns(columns: Sequence[Sequence[str | None]]) -> list[str] | None:
    """Every column packed, or None when one of them can't be (send binary arrays instead)."""
    packed: list[str] = []
    for column in columns:
        p = pack(column)
        if p is None:
            return None
        packed.append(p)
    return packed

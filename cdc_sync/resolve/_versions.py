"""Row versions and counter arithmetic on PostgreSQL text forms. Pure functions, stdlib only.

Contract:

- `parse_version(text)` turns a version column's text into a `Version`: an integer or numeric
  (exact, as `Decimal`), else a timestamp (PostgreSQL's ISO output: `2026-11-28 12:00:00.123+00`,
  `+05:30`, `+00:53:28`, no zone for `timestamp without time zone`, a bare date), else the raw
  string. `infinity` / `-infinity` (timestamps, numeric, float) and `NaN` are understood.
- `Version` has a total order that every site computes alike:
  NULL < -infinity < raw strings < numbers < timestamps < +infinity < NaN.
  Values of one kind compare by value (numbers numerically, timestamps by instant with a zone-less
  timestamp read as UTC, strings by code point). Mixed kinds — incomparable — fall back to that
  fixed kind order, so a NULL or garbage version loses against a real one.
- `timestamp_version(dt)` is the version of a commit timestamp (None: NULL).
- `delete_version(V, C)` is the version of a delete committed at C of a row whose version text
  was V: C when V is unknown (None), the later of V and C for a timestamp V, else V itself.
- `add_delta(local, new, old)` computes `local + (new - old)` exactly for counter columns and
  formats it back to text, keeping `local`'s scale unless more digits are needed; None when any
  of the three is NULL, not a finite number, or not a number at all.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import NamedTuple

__all__ = ["Version", "add_delta", "delete_version", "parse_version", "timestamp_version"]

NULL_RANK = 0
NEG_INFINITY_RANK = 1
TEXT_RANK = 2
NUMBER_RANK = 3
TIMESTAMP_RANK = 4
POS_INFINITY_RANK = 5
NAN_RANK = 6


class Version(NamedTuple):
    """A comparable version: `rank` orders the kinds, `value` orders within a kind (a named
    tuple: compared in C, which matters as every change compares a few).

    Within one rank `value` always has one type (`Decimal`, an aware `datetime` or `str`), so
    the ordering never compares across types.
    """

    rank: int
    value: Decimal | datetime | str = ""

    @property
    def is_null(self) -> bool:
        return self.rank == NULL_RANK


NULL_VERSION = Version(NULL_RANK)

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# PostgreSQL's ISO DateStyle output (and the ISO 8601 "T" form): date, optional time with up to
# 6 fractional digits, optional zone "Z", "+HH", "+HH:MM" or "+HH:MM:SS" (also without colons).
_TIMESTAMP = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[ T](?P<time>\d{2}:\d{2}(?::\d{2})?)(?:\.(?P<frac>\d{1,6}))?)?"
    r"\s*(?:(?P<utc>Z)|(?P<sign>[+-])(?P<hh>\d{2})(?::?(?P<mm>\d{2}))?(?::?(?P<ss>\d{2}))?)?"
)
# Exact arithmetic whatever the size of a numeric (PostgreSQL allows 131072 digits).
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


def parse_version(text: str | None) -> Version:
    """The `Version` of a version column's text value (see the module docstring)."""
    if text is None:
        return NULL_VERSION
    s = text.strip()
    lowered = s.lower()
    if lowered in ("infinity", "+infinity", "inf", "+inf"):
        return Version(POS_INFINITY_RANK)
    if lowered in ("-infinity", "-inf"):
        return Version(NEG_INFINITY_RANK)
    if lowered == "nan":
        return Version(NAN_RANK)
    if _NUMBER.fullmatch(s):
        return Version(NUMBER_RANK, Decimal(s))
    stamp = parse_timestamp(s)
    if stamp is not None:
        return Version(TIMESTAMP_RANK, stamp)
    return Version(TEXT_RANK, text)


def timestamp_version(value: datetime | None) -> Version:
    """The version of a commit timestamp; None (unknown) is the NULL version."""
    if value is None:
        return NULL_VERSION
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # Aware datetimes compare (and hash) by instant whatever their zone: no conversion needed.
    return Version(TIMESTAMP_RANK, value)


def delete_version(deleted: str | None, commit_ts: datetime | None) -> Version:
    """The version of a delete committed at `commit_ts` of a row whose version-column text was
    `deleted` (None: not known). Unknown: the commit time. A timestamp: the later of the two (a
    delete is at least as new as what it deleted, and dated by when it happened). Any other
    kind (numbers, text): the deleted version itself, as commit times do not compare with it.
    """
    if deleted is None:
        return timestamp_version(commit_ts)
    version = parse_version(deleted)
    if version.rank == TIMESTAMP_RANK:
        return max(version, timestamp_version(commit_ts))
    return version


def is_timestamp(version: Version) -> bool:
    return version.rank == TIMESTAMP_RANK


def parse_timestamp(text: str) -> datetime | None:
    """A PostgreSQL timestamp/timestamptz/date text as an aware UTC datetime, else None.

    Normalises PostgreSQL's forms for `datetime.fromisoformat`: the zone `+00` becomes `+00:00`,
    fractions are padded to microseconds; a value without zone is read as UTC. Years beyond
    9999 and BC dates are not timestamps here (the caller keeps them as raw strings).
    """
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        return None
    iso = m["date"]
    if m["time"] is not None:
        time = m["time"] if m["time"].count(":") == 2 else m["time"] + ":00"
        iso += "T" + time
        if m["frac"] is not None:
            iso += "." + m["frac"].ljust(6, "0")
    else:
        iso += "T00:00:00"
    if m["utc"] is not None:
        iso += "+00:00"
    elif m["sign"] is not None:
        iso += f"{m['sign']}{m['hh']}:{m['mm'] or '00'}"
        if m["ss"] is not None:
            iso += f":{m['ss']}"
    try:
        parsed = datetime.fromisoformat(iso)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # no such date, or beyond year 9999 in UTC
        return None


def _finite(text: str | None) -> Decimal | None:
    if text is None:
        return None
    s = text.strip()
    if not _NUMBER.fullmatch(s):
        return None
    return Decimal(s)


def _scale(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite by construction
    return max(0, -exponent)


def add_delta(local: str | None, new: str | None, old: str | None) -> str | None:
    """`local + (new - old)` as text, exact; None if any operand is not a finite number.

    The result keeps `local`'s number of fractional digits unless the delta needs more
    ("10.50" + ("3.25" - "1.00") = "12.75"; "10" + ("7" - "3") = "14"; "10.5" + ("2.25" -
    "0.25") = "12.5"). Never in exponent notation; zero has no sign.
    """
    lv, nv, ov = _finite(local), _finite(new), _finite(old)
    if lv is None or nv is None or ov is None:
        return None
    result = _EXACT.add(lv, _EXACT.subtract(nv, ov))
    keep = _scale(lv)
    scale = _scale(result)
    while scale > keep:
        shorter = _EXACT.quantize(result, Decimal(1).scaleb(-(scale - 1)))
        if shorter != result:
            break
        result, scale = shorter, scale - 1
    if scale < keep:
        result = _EXACT.quantize(result, Decimal(1).scaleb(-keep))
    if result.is_zero():
        result = result.copy_abs()
    return format(result, "f")

"""PostgreSQL timestamps on the wire: microseconds since 2000-01-01 UTC, to and from `datetime`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


def pg_timestamp_to_datetime(micros: int) -> datetime:
    """Convert microseconds since 2000-01-01 UTC to an aware `datetime`."""
    return PG_EPOCH + timedelta(microseconds=micros)


def datetime_to_pg_timestamp(value: datetime) -> int:
    """Convert an aware `datetime` to microseconds since 2000-01-01 UTC."""
    delta = value - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

"""Key-bucket locks: replicators writing into the same site never deadlock each other.

Several replicators (one per office) apply into one site database at once. Two of them that
decide the same key must not interleave (a row lock cannot cover a key that has no row yet),
and locks held until commit must never form a cycle between them. The scheme:

- Every key of a table on a conflict-resolving path hashes to one of `BUCKETS` buckets; a
  bucket is the transaction-level advisory lock (`LOCK_CLASS`, bucket).
- A target transaction takes all the buckets it needs **before its first write, in ascending
  order, in one statement**, and none afterwards. Two transactions that acquire in one global
  order cannot wait for each other in a cycle (the classic ordered-locking argument); and
  since no write precedes the acquisition, no row lock of ours is held while we wait.
- A target transaction whose changes are not all known when it starts (a large source
  transaction applied chunk by chunk, a group of transactions flushed in several chunks)
  takes every bucket at its first chunk (`all_buckets`), in the same order.

Deadlocks remain possible only with the site's own local writers (they take row locks in
their own order and no buckets); the server breaks those, and the worker retries just that
target transaction. `BUCKETS` bounds the lock-table entries a transaction uses (the shared
lock table holds `max_locks_per_transaction` x connections entries; a lock per key would
exhaust it on a large batch).

The source registry (`cdc_sync.sources`, see `REGISTER_SQL`) has a lock of its own, outside
the buckets' range: a resolving target transaction holds it shared while it reads which
sources apply into the site (`SOURCES_SQL`), and a source registers under it exclusively, so a
registration waits for every target transaction that read the registry without it.

Pure functions apart from the SQL text; the bucket of a key is the same in every process and
every office (CRC-32 of the table name and the key's text values).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Final

__all__ = ["BUCKETS", "LOCK_CLASS", "LOCK_SQL", "REGISTER_SQL", "REGISTRY_SHARED_SQL",
           "SOURCES_SQL", "all_buckets", "bucket_of"]

BUCKETS: Final = 64
# The advisory-lock class (first int4 of the two-key form): "CDCS".
LOCK_CLASS: Final = 0x43444353
LOCK_SQL: Final = (
    "SELECT count(pg_advisory_xact_lock(%s::int4, b)) FROM unnest(%s::int4[]) AS u(b)")
_ALL: Final = tuple(range(BUCKETS))
_REGISTRY: Final = BUCKETS  # the registry's lock: (LOCK_CLASS, BUCKETS)
REGISTRY_SHARED_SQL: Final = (
    f"SELECT pg_advisory_xact_lock_shared({LOCK_CLASS}::int4, {_REGISTRY}::int4)")
# After REGISTRY_SHARED_SQL, in a statement of its own (its snapshot is taken once it holds
# the lock): whether a source other than the parameter applies into the site.
SOURCES_SQL: Final = "SELECT EXISTS (SELECT 1 FROM cdc_sync.sources WHERE source <> %s)"
# Statements of one transaction registering the source given as parameter.
REGISTER_SQL: Final = (
    f"SELECT pg_advisory_xact_lock({LOCK_CLASS}::int4, {_REGISTRY}::int4)",
    "INSERT INTO cdc_sync.sources (source) VALUES (%s) ON CONFLICT (source) DO NOTHING")
_SEP: Final = "\x1f"


def bucket_of(table: str, key: Sequence[Any]) -> int:
    """The bucket of `key` (the key columns' text values, None for NULL) of `table`."""
    text = table + _SEP + _SEP.join("\x00" if v is None else str(v) for v in key)
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % BUCKETS


def all_buckets() -> tuple[int, ...]:
    return _ALL


def missing_sorted(needed: Iterable[int], held: set[int]) -> list[int]:
    """The buckets of `needed` not in `held`, ascending (the order they must be taken in)."""
    return sorted(set(needed) - held)

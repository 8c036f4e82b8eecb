"""Merge functions the multi-directional tests name in `[conflicts] merge = "module:function"`.

Imported by the replicator as `tests.multi.merge_funcs` (the repository root is on sys.path
when the suite runs). A merge function is called as `fn(local, incoming, change)` with the
site's row and the incoming row as dicts of PostgreSQL text values (or None).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any


def _amount(row: dict[str, Any]) -> Decimal:
    value = row.get("amount")
    return Decimal(value) if value is not None else Decimal("-Infinity")


def prefer_larger_amount(local: dict[str, Any] | None, incoming: dict[str, Any] | None,
                         change: object) -> dict[str, Any] | None:
    """Keep whichever whole row has the larger `amount` (ties: the larger `note`).

    Symmetric in `local` and `incoming`, so every office decides alike and they converge.
    A delete (`incoming` None) of a row we still have keeps the local row; a change to a row
    we do not have takes the incoming row.
    """
    if local is None:
        return incoming
    if incoming is None:
        return local
    key_local = (_amount(local), local.get("note") or "")
    key_incoming = (_amount(incoming), incoming.get("note") or "")
    return dict(local) if key_local >= key_incoming else dict(incoming)

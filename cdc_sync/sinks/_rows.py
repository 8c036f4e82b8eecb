"""Row helpers shared by the applier paths: tuples to column dicts, keys, JSON for bookkeeping."""

from __future__ import annotations

from typing import Any

from ..changes import Change, Op, Table
from ..protocol import TupleData


def as_dict(table: Table, values: TupleData | None, *, only: tuple[int, ...] | None = None
            ) -> dict[str, str | None] | None:
    """Column name → text value; unchanged TOAST placeholders are left out."""
    if values is None:
        return None
    idx = range(len(values)) if only is None else only
    out: dict[str, str | None] = {}
    for i in idx:
        v = values[i]
        if isinstance(v, bytes):
            out[table.columns[i]] = v.decode("utf-8", "replace")
        elif v is None or isinstance(v, str):
            out[table.columns[i]] = v
        # else: an unchanged TOAST placeholder, left out
    return out


def key_values(change: Change, key: tuple[int, ...]) -> TupleData:
    """The key identifying the row a change touches *before* it (old key when sent)."""
    if change.op is Op.INSERT:
        src = change.new
    elif change.old is not None:
        src = change.old
    else:
        src = change.new
    assert src is not None
    if len(key) == 1:  # the rule; a generator costs more than the lookup itself
        return (src[key[0]],)
    return tuple([src[i] for i in key])


def key_dict(table: Table, key: tuple[int, ...], values: TupleData) -> dict[str, Any]:
    columns = table.columns
    if len(key) == 1 and len(values) == 1:
        return {columns[key[0]]: values[0]}
    return dict(zip([columns[i] for i in key], values, strict=True))


def describe_change(change: Change, key: tuple[int, ...]) -> dict[str, Any]:
    """Table, key, row and old row of a change as JSON-able dicts (for dead letters)."""
    table = change.table
    if table is None:
        names = [t.qualified for t in change.truncated]
        return {"table": ",".join(names), "key": None, "row": None, "old": None}
    k = key or table.key
    return {
        "table": table.qualified,
        "key": key_dict(table, k, key_values(change, k)) if k else None,
        "row": as_dict(table, change.new),
        "old": as_dict(table, change.old),
    }

"""`StreamSpool`: large transactions streamed while in progress, held on disk until they end.

Contract:
- Used where a streamed transaction cannot be applied as it arrives (a table resolves conflicts,
  an outbox or subscriber needs the commit first; see `pipeline.stream_apply_possible`): the
  server still streams it (protocol 2), so the source never spills it to its own disk and the
  transfer overlaps the source's work, as native `streaming = on` does. The pipeline spools each
  `TxStreamChanges` chunk once (decode once), before any site sees it.
- `commit` returns the transaction as an ordinary `TxBegin`, `TxChanges`…, `TxCommit`, read back
  one chunk at a time (a huge transaction never sits in memory whole), in source order, with
  its commit LSN, commit time and origin; sites then treat it like any other transaction.
- `abort` of the top-level transaction drops it; of a subtransaction, drops that
  subtransaction's chunks and everything streamed after its first one (its own
  subtransactions: the server streams changes in WAL order, so nothing else can follow it).
- Spool files are anonymous temporary files (in `directory`, default the system's temporary
  directory), gone when closed or when the process dies. `reset` (a new stream session, which
  streams open transactions again from their start) forgets everything.
- A file that cannot be written or read raises `SpoolError` (one line, with the transaction).
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .changes import (
    Change,
    Op,
    Table,
    TxBegin,
    TxChanges,
    TxCommit,
    TxItem,
    TxStreamAbort,
    TxStreamChanges,
    TxStreamCommit,
)
from .errors import CdcSyncError

__all__ = ["SpoolError", "StreamSpool"]

_ROW_OPS = (Op.INSERT, Op.UPDATE, Op.DELETE)
_ROW_CODE = {op: i for i, op in enumerate(_ROW_OPS)}
_OTHER = -1  # a truncate or message: stored as the Change itself (rare)
_new_tuple = tuple.__new__


class SpoolError(CdcSyncError):
    """A streamed transaction could not be spooled or read back."""


@dataclass(slots=True)
class _Spooled:
    file: IO[bytes]
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (subxid, offset) per chunk


class StreamSpool:
    """Streamed transactions by top-level xid, each in a temporary file (see module doc)."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self._open: dict[int, _Spooled] = {}
        self._tables: list[Table] = []
        self._table_index: dict[int, int] = {}  # id(table) -> index; `_tables` keeps them alive

    @property
    def open_transactions(self) -> int:
        return len(self._open)

    def spooled_bytes(self) -> int:
        """Bytes on disk for the open streamed transactions."""
        return sum(s.file.tell() for s in self._open.values())

    def add(self, item: TxStreamChanges) -> None:
        spooled = self._open.get(item.xid)
        if spooled is None:
            try:
                spooled = _Spooled(tempfile.TemporaryFile(dir=self.directory))
            except OSError as exc:
                raise SpoolError(f"cannot spool streamed transaction {item.xid}: {exc}") from None
            self._open[item.xid] = spooled
        f = spooled.file
        offset = f.tell()
        try:
            pickle.dump(self._encode(item.changes), f, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as exc:
            f.seek(offset)
            f.truncate()
            raise SpoolError(f"cannot spool streamed transaction {item.xid}: {exc}") from None
        spooled.chunks.append((item.subxid, offset))

    def abort(self, item: TxStreamAbort) -> None:
        spooled = self._open.get(item.xid)
        if spooled is None:
            return
        if item.subxid == item.xid:
            del self._open[item.xid]
            spooled.file.close()
            return
        for i, (subxid, offset) in enumerate(spooled.chunks):
            if subxid == item.subxid:
                spooled.file.seek(offset)
                spooled.file.truncate()
                del spooled.chunks[i:]
                return

    def commit(self, item: TxStreamCommit) -> Iterator[TxItem]:
        """The committed transaction as ordinary items; its spool file is closed once read."""
        spooled = self._open.pop(item.xid, None)
        yield TxBegin(item.xid, item.commit_lsn, item.commit_ts, item.origin)
        if spooled is not None:
            try:
                yield from self._read(item.xid, spooled)
            finally:
                spooled.file.close()
        yield TxCommit(item.commit_lsn, item.end_lsn, item.commit_ts)

    def reset(self) -> None:
        for spooled in self._open.values():
            spooled.file.close()
        self._open.clear()
        self._tables.clear()
        self._table_index.clear()

    # -- encoding --------------------------------------------------------------------------
    # A chunk is pickled as a list of rows: a row change as the plain tuple (op code,
    # position, table index, new, old, old_is_key), which pickles at C speed (a NamedTuple
    # holding a dataclass pickles about seven times slower), its Table kept here by index;
    # anything else as the Change itself.
    def _encode(self, changes: tuple[Change, ...]) -> list[tuple[Any, ...]]:
        index, tables = self._table_index, self._tables
        out: list[tuple[Any, ...]] = []
        append = out.append
        for c in changes:
            code = _ROW_CODE.get(c.op, _OTHER)
            if code == _OTHER:
                append((_OTHER, c))
                continue
            t = c.table
            ti = index.get(id(t))
            if ti is None:
                ti = index[id(t)] = len(tables)
                tables.append(t)  # type: ignore[arg-type]  # a row change has its table
            append((code, c.position, ti, c.new, c.old, c.old_is_key))
        return out

    def _read(self, xid: int, spooled: _Spooled) -> Iterator[TxChanges]:
        f = spooled.file
        tables = self._tables
        try:
            f.seek(0)
            for _ in spooled.chunks:
                rows = pickle.load(f)
                yield TxChanges(tuple(
                    r[1] if r[0] == _OTHER else
                    _new_tuple(Change, (_ROW_OPS[r[0]], r[1], tables[r[2]], r[3], r[4], r[5],
                                        (), 0, "", b""))
                    for r in rows))
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            raise SpoolError(f"cannot read back spooled transaction {xid}: {exc}") from None

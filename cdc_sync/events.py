"""Change events: the JSON shape connectors, the outbound table and subscribers see.

Contract (ARCHITECTURE.md, "Events"):

- One `Event` per row change / emitted message, with exactly the fields `id, source, topic,
  table, op, lsn, commit_ts, key, row, old`, in that order in the JSON (`to_json`/`as_dict`).
- `id` = `event_id(source, commit_lsn, position)` = `"<source>/<X/Y commit LSN>/<position>"`,
  stable across restarts and redeliveries. A TRUNCATE of several tables is one change but one
  event per table: the i-th table (from 0) gets `"<source>/<lsn>/<position>.<i>"`; a
  single-table TRUNCATE keeps the plain id.
- `lsn` is the commit LSN of the source transaction (the same for all its events);
  `commit_ts` its commit time, ISO 8601 in UTC with microseconds: `2026-11-28T12:00:00.123456+00:00`.
- insert: `row` = the new row, `old` null. update: `row` = the new row, `old` = the old row
  when the server sent one (REPLICA IDENTITY FULL, or the key columns only when the key
  changed), else null. delete: `row` null, `old` = the old row (the key columns, or the whole
  row with REPLICA IDENTITY FULL). `key` = the replica-identity columns, from the new row for
  insert/update (an unchanged-TOAST key value is taken from the old row when sent) and from
  the old row for delete; null for a table without a key.
- Unchanged TOASTed values (an update that did not touch a large value; the server does not
  send it) are OMITTED from `row`: a missing column means "unchanged", a JSON null means NULL.
- JSON values by the column's type OID: int2/int4/int8/oid → integer; float4/float8 → number,
  `"NaN"`, `"Infinity"`, `"-Infinity"` as strings; numeric → string (exact, `"NaN"` too);
  bool → true/false; json/jsonb → embedded (a number too large for a double stays a string);
  arrays of the built-in types → (nested) arrays with NULLs as null and elements typed as
  scalars; everything else (and arrays of user-defined types, whose element type the stream
  does not tell) → PostgreSQL's text form as a string. A value that does not parse as its
  type says (never expected) falls back to its text form. Binary-format values (not used by
  our stream) become `"\\x<hex>"`.
- truncate: one event per table, `op` "truncate", `key`/`row`/`old` null.
- message (`pg_logical_emit_message`): prefix `cdc_sync:<topic>` → `topic` = `<topic>`,
  `row` = the content parsed as JSON when it is a UTF-8 JSON object (what `emit_change`
  writes); any other prefix (or non-object content) → `topic` = the prefix, `row` =
  `{"content": <content as UTF-8 text>}` or, when it is not UTF-8, `{"content": <base64>,
  "encoding": "base64"}`. `table`, `key` and `old` are null. The prefix `cdc_sync.heartbeat`
  (our heartbeats) produces no event at all.
- `outbox_rows(source, begin, changes, tables=...)` builds the rows the outbox site's applier
  inserts: `(id, source, topic, event_json_text, commit_ts)`; `tables` (fnmatch patterns over
  `topic`) leaves out non-matching events. The JSON text is ASCII-only (\\u escapes), and as
  jsonb cannot hold U+0000 or lone surrogates (possible in a `json` column), in the outbox
  copy only those characters are replaced by U+FFFD.

Conversion is on the applier's hot path: per-table converters are computed once per `Table`
object (cached, identity fast path) and the commit timestamp is formatted once per call.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from .changes import UNCHANGED_TOAST, Change, Op, Table, TxBegin
from .config import table_matches
from .protocol import Lsn

__all__ = [
    "EMIT_PREFIX",
    "HEARTBEAT_PREFIX",
    "Event",
    "change_to_event",
    "event_dicts",
    "event_id",
    "events_for_change",
    "format_commit_ts",
    "outbox_rows",
    "parse_array",
    "transaction_events",
]

EMIT_PREFIX: Final = "cdc_sync:"
HEARTBEAT_PREFIX: Final = "cdc_sync.heartbeat"

OutboxRow = tuple[str, str, str, str, datetime]
Patterns = Sequence[str]


@dataclass(frozen=True, slots=True)
class Event:
    """One change event (see the module docstring for every field)."""

    id: str
    source: str
    topic: str
    table: str | None
    op: str
    lsn: str
    commit_ts: str
    key: dict[str, Any] | None
    row: dict[str, Any] | None
    old: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "source": self.source, "topic": self.topic, "table": self.table,
            "op": self.op, "lsn": self.lsn, "commit_ts": self.commit_ts, "key": self.key,
            "row": self.row, "old": self.old,
        }

    def to_json(self) -> str:
        return _dumps(self.as_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        fields: dict[str, Any] = {name: data.get(name) for name in _FIELDS}
        return cls(**fields)


_FIELDS: Final = ("id", "source", "topic", "table", "op", "lsn", "commit_ts", "key", "row", "old")


_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def event_id(source: str, commit_lsn: Lsn | int, position: int) -> str:
    """`"<source>/<X/Y>/<position>"`, e.g. `"washington/0/1A2B3C4/3"`."""
    return f"{source}/{Lsn(commit_lsn)}/{position}"


def format_commit_ts(ts: datetime) -> str:
    """ISO 8601, UTC, microseconds: `2026-11-28T12:00:00.123456+00:00`."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


# -- scalar converters -------------------------------------------------------------------------

Converter = Callable[[str], Any]

_INF_NAN: Final = frozenset({"NaN", "Infinity", "-Infinity"})


def _to_float(text: str) -> Any:
    if text in _INF_NAN:
        return text
    value = float(text)
    if math.isfinite(value):
        return value
    return text  # "inf"/"nan" spelt differently: keep the text


def _to_bool(text: str) -> Any:
    if text == "t":
        return True
    if text == "f":
        return False
    raise ValueError(text)


def _json_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else text


def _json_constant(text: str) -> Any:
    # PostgreSQL never produces NaN/Infinity in json text; keep the token as a string anyway.
    return text


_DECODER: Final = json.JSONDecoder(parse_float=_json_float, parse_constant=_json_constant)


def _to_json(text: str) -> Any:
    return _DECODER.decode(text)


INT2, INT4, INT8, OID = 21, 23, 20, 26
FLOAT4, FLOAT8, NUMERIC, BOOL, JSON, JSONB = 700, 701, 1700, 16, 114, 3802

# Scalar type OID → converter; a type not listed stays text (None = identity).
_SCALARS: Final[dict[int, Converter]] = {
    INT2: int, INT4: int, INT8: int, OID: int,
    FLOAT4: _to_float, FLOAT8: _to_float,
    BOOL: _to_bool,
    JSON: _to_json, JSONB: _to_json,
}

# Built-in array type OID → element type OID (pg_type.typelem). numeric stays text, as do the
# element types without a converter. _box is the one built-in array with ';' as delimiter.
_ARRAYS: Final[dict[int, int]] = {
    1000: BOOL, 1005: INT2, 1007: INT4, 1016: INT8, 1028: OID, 1021: FLOAT4, 1022: FLOAT8,
    1231: NUMERIC, 199: JSON, 3807: JSONB,
    1001: 17, 1002: 18, 1003: 19, 1006: 22, 1008: 24, 1009: 25, 1010: 27, 1011: 28, 1012: 29,
    1013: 30, 143: 142, 1017: 600, 1018: 601, 1019: 602, 1020: 603, 1027: 604, 629: 628,
    719: 718, 791: 790, 1040: 829, 775: 774, 1041: 869, 651: 650, 1014: 1042, 1015: 1043,
    1182: 1082, 1183: 1083, 1115: 1114, 1185: 1184, 1187: 1186, 1270: 1266, 1561: 1560,
    1563: 1562, 2201: 1790, 2207: 2202, 2208: 2203, 2209: 2204, 2210: 2205, 2211: 2206,
    4090: 4089, 4097: 4096, 3643: 3614, 3645: 3615, 3644: 3642, 2951: 2950, 3221: 3220,
    3905: 3904, 3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926, 4073: 4072,
    2949: 2970, 271: 5069, 1263: 2275,
}
_BOX_ARRAY: Final = 1020


def _array_token_re(delim: str) -> re.Pattern[str]:
    d = re.escape(delim)
    return re.compile(
        r'\s*(?:(\{)|(\})|(' + d + r')|"((?:[^"\\]|\\.)*)"|((?:[^{}"\\' + d + r'\s]|\\.)'
        r'(?:[^{}"\\' + d + r']|\\.)*))', re.DOTALL)


_ARRAY_TOKENS: Final = {",": _array_token_re(","), ";": _array_token_re(";")}
_UNESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)
_DIMENSIONS: Final = re.compile(r"\s*(?:\[[^\]]*\]\s*)+=\s*")


def parse_array(text: str, element: Converter | None = None, delim: str = ",") -> list[Any]:
    """Parse PostgreSQL's array text form into nested lists.

    Handles `NULL` (unquoted, any case) → None, quoted elements with backslash escapes, nested
    (multi-dimensional) arrays, and a leading dimension decoration (`[0:1]={…}`). `element`
    converts each non-NULL element (a `ValueError` leaves that element as text).
    Raises `ValueError` on malformed input.
    """
    match = _DIMENSIONS.match(text)
    pos = match.end() if match else 0
    if text.startswith("{") and "\\" not in text and '"' not in text and "{" not in text[1:]:
        # The common case: one dimension, nothing quoted.
        body = text[1:].rstrip()
        if not body.endswith("}"):
            raise ValueError("malformed array literal")
        body = body[:-1]
        if "}" in body:
            raise ValueError("malformed array literal")
        if not body.strip():
            return []
        parts = [part.strip() for part in body.split(delim)]
        if "" in parts:
            raise ValueError("malformed array literal")
        return [_array_element(part, False, element) for part in parts]
    token_re = _ARRAY_TOKENS.get(delim) or _array_token_re(delim)
    stack: list[list[Any]] = []
    kinds: list[int] = []  # per open level: 1 = has elements, 2 = has sub-arrays
    result: list[Any] | None = None
    expect_item = True
    end = len(text)
    while pos < end:
        m = token_re.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise ValueError("malformed array literal")
        pos = m.end()
        opening, closing, sep, quoted, bare = m.groups()
        if result is not None:
            raise ValueError("junk after array literal")
        if opening:
            if not expect_item:
                raise ValueError("malformed array literal")
            stack.append([])
            kinds.append(0)
        elif closing:
            if not stack or (expect_item and stack[-1]):
                raise ValueError("malformed array literal")
            done = stack.pop()
            kinds.pop()
            if stack:
                kinds[-1] |= 2
                if kinds[-1] == 3:
                    raise ValueError("malformed array literal: mixed dimensions")
                stack[-1].append(done)
                expect_item = False
            else:
                result = done
        elif sep:
            if expect_item or not stack:
                raise ValueError("malformed array literal")
            expect_item = True
        else:
            if not stack or not expect_item:
                raise ValueError("malformed array literal")
            kinds[-1] |= 1
            if kinds[-1] == 3:
                raise ValueError("malformed array literal: mixed dimensions")
            if quoted is not None:
                stack[-1].append(_array_element(quoted, True, element))
            else:
                stack[-1].append(_array_element(bare.rstrip(), False, element))
            expect_item = False
            continue
        if opening:
            expect_item = True
    if result is None:
        raise ValueError("malformed array literal")
    return result


def _array_element(raw: str, quoted: bool, element: Converter | None) -> Any:
    if not quoted and raw.upper() == "NULL":
        return None
    if "\\" in raw:
        raw = _UNESCAPE.sub(r"\1", raw)
    if element is None:
        return raw
    try:
        return element(raw)
    except ValueError:
        return raw


def _array_converter(element_oid: int, delim: str) -> Converter:
    element = _SCALARS.get(element_oid)

    def convert(text: str) -> Any:
        return parse_array(text, element, delim)

    return convert


def converter_for(type_oid: int) -> Converter | None:
    """The text → JSON value converter of a type OID; None: the text form as is."""
    scalar = _SCALARS.get(type_oid)
    if scalar is not None:
        return scalar
    element_oid = _ARRAYS.get(type_oid)
    if element_oid is not None:
        return _array_converter(element_oid, ";" if type_oid == _BOX_ARRAY else ",")
    return None


# -- per-table conversion ----------------------------------------------------------------------

class _TableShape:
    """The converters of one table, computed once."""

    __slots__ = ("columns", "convs", "key", "key_names", "qualified")

    def __init__(self, table: Table) -> None:
        self.qualified = table.qualified
        self.columns = table.columns
        self.convs = tuple(converter_for(oid) for oid in table.type_oids)
        self.key = table.key
        self.key_names = table.key_columns

    def row(self, values: Sequence[Any], only: Sequence[int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        columns, convs = self.columns, self.convs
        indexes: Iterable[int] = range(min(len(values), len(columns))) if only is None else only
        for i in indexes:
            v = values[i]
            if v.__class__ is str:
                conv = convs[i]
                if conv is None:
                    out[columns[i]] = v
                else:
                    try:
                        out[columns[i]] = conv(v)
                    except ValueError:
                        out[columns[i]] = v
            elif v is None:
                out[columns[i]] = None
            elif v is UNCHANGED_TOAST:
                continue
            elif isinstance(v, bytes):
                out[columns[i]] = "\\x" + v.hex()
            else:  # pragma: no cover - the decoder produces nothing else
                out[columns[i]] = str(v)
        return out

    def key_of(self, row: dict[str, Any] | None,
               fallback: Sequence[Any] | None = None) -> dict[str, Any] | None:
        """The key columns of an already converted `row`; a key value missing from it (an
        unchanged-TOAST value) is taken from the raw `fallback` tuple when given."""
        if not self.key or row is None:
            return None
        try:
            return {name: row[name] for name in self.key_names}
        except KeyError:
            pass
        extra = self.row(fallback, self.key) if fallback is not None else {}
        return {name: row[name] if name in row else extra[name]
                for name in self.key_names if name in row or name in extra}


_SHAPES: dict[Table, _TableShape] = {}
_MAX_SHAPES: Final = 4096
_last: tuple[Table, _TableShape] | None = None


def _shape(table: Table) -> _TableShape:
    global _last
    last = _last
    if last is not None and last[0] is table:
        return last[1]
    shape = _SHAPES.get(table)
    if shape is None:
        if len(_SHAPES) >= _MAX_SHAPES:
            _SHAPES.clear()
        shape = _SHAPES[table] = _TableShape(table)
    _last = (table, shape)
    return shape


# -- events ------------------------------------------------------------------------------------

class _Tx:
    """What every event of one transaction shares, formatted once."""

    __slots__ = ("commit_ts", "lsn", "prefix", "source")

    def __init__(self, source: str, begin: TxBegin) -> None:
        self.source = source
        self.lsn = str(Lsn(begin.commit_lsn))
        self.commit_ts = format_commit_ts(begin.commit_ts)
        self.prefix = f"{source}/{self.lsn}/"


Wanted = Callable[[str], bool]
_OP_NAMES: Final = {op: op.value for op in Op}


def _event_dicts(tx: _Tx, change: Change, wanted: Wanted | None) -> list[dict[str, Any]]:
    op = change.op
    table = change.table
    if table is not None and op is not Op.TRUNCATE:
        shape = _shape(table)
        topic = shape.qualified
        if wanted is not None and not wanted(topic):
            return []
        old_values = change.old
        old = None
        if old_values is not None:
            old = shape.row(old_values, shape.key if change.old_is_key else None)
        if op is Op.DELETE:
            row = None
            key = shape.key_of(old)
        else:
            new = change.new
            row = shape.row(new) if new is not None else None
            key = shape.key_of(row, old_values)
        return [{
            "id": tx.prefix + str(change.position), "source": tx.source, "topic": topic,
            "table": topic, "op": _OP_NAMES[op], "lsn": tx.lsn, "commit_ts": tx.commit_ts,
            "key": key, "row": row, "old": old,
        }]
    if op is Op.TRUNCATE:
        out = []
        several = len(change.truncated) > 1
        for i, t in enumerate(change.truncated):
            topic = t.qualified
            if wanted is not None and not wanted(topic):
                continue
            suffix = f"{change.position}.{i}" if several else str(change.position)
            out.append({
                "id": tx.prefix + suffix, "source": tx.source, "topic": topic, "table": topic,
                "op": op.value, "lsn": tx.lsn, "commit_ts": tx.commit_ts,
                "key": None, "row": None, "old": None,
            })
        return out
    if op is Op.MESSAGE:
        prefix = change.prefix
        if prefix == HEARTBEAT_PREFIX:
            return []
        topic, payload = _message(prefix, change.content)
        if wanted is not None and not wanted(topic):
            return []
        return [{
            "id": tx.prefix + str(change.position), "source": tx.source, "topic": topic,
            "table": None, "op": op.value, "lsn": tx.lsn, "commit_ts": tx.commit_ts,
            "key": None, "row": payload, "old": None,
        }]
    return []  # pragma: no cover - a row change always has its table


def _matcher(tables: Patterns | None) -> Wanted | None:
    """A cached `table_matches(tables, topic)`; None for no filter."""
    if tables is None:
        return None
    patterns = tuple(tables)
    matched: dict[str, bool] = {}

    def wanted(topic: str) -> bool:
        hit = matched.get(topic)
        if hit is None:
            hit = matched[topic] = table_matches(patterns, topic)
        return hit

    return wanted


def _message(prefix: str, content: bytes) -> tuple[str, dict[str, Any]]:
    try:
        text: str | None = content.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if prefix.startswith(EMIT_PREFIX) and len(prefix) > len(EMIT_PREFIX) and text is not None:
        try:
            data = _to_json(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return prefix[len(EMIT_PREFIX):], data
    if text is not None:
        return prefix, {"content": text}
    return prefix, {"content": base64.b64encode(content).decode("ascii"), "encoding": "base64"}


def event_dicts(source: str, begin: TxBegin, changes: Iterable[Change], *,
                wanted: Wanted | None = None) -> list[dict[str, Any]]:
    """The events of changes of one transaction as JSON-ready dicts (`Event.as_dict` shape),
    in order; `wanted(topic)` (if given) leaves out the events it rejects before any value is
    converted."""
    tx = _Tx(source, begin)
    return [d for change in changes for d in _event_dicts(tx, change, wanted)]


def events_for_change(source: str, begin: TxBegin, change: Change, *,
                      tables: Patterns | None = None) -> list[Event]:
    """Every event of one change: none (heartbeat, filtered out), one, or one per truncated
    table. `tables`: fnmatch patterns over `topic`; None keeps everything."""
    return [Event(**d) for d in _event_dicts(_Tx(source, begin), change, _matcher(tables))]


def change_to_event(source: str, begin: TxBegin, change: Change) -> Event | None:
    """The event of a change; None for a heartbeat message.

    A TRUNCATE of several tables has one event per table: use `events_for_change` (this raises
    `ValueError` for it)."""
    events = events_for_change(source, begin, change)
    if len(events) > 1:
        raise ValueError("a TRUNCATE of several tables has several events: "
                         "use events_for_change")
    return events[0] if events else None


def transaction_events(source: str, begin: TxBegin, changes: Iterable[Change], *,
                       tables: Patterns | None = None) -> list[Event]:
    """The events of a run of changes of one transaction, in order."""
    return [Event(**d) for d in event_dicts(source, begin, changes, wanted=_matcher(tables))]


def outbox_rows(source: str, begin: TxBegin, changes: Iterable[Change], *,
                tables: Patterns | None = None) -> list[OutboxRow]:
    """Rows for `cdc_sync.outbox`: `(id, source, topic, event_json_text, commit_ts)`.

    Insert them in the applying transaction, `ON CONFLICT (id) DO NOTHING` (a replayed
    transaction produces the same ids). `tables` leaves out events whose topic matches none
    of the patterns."""
    tx = _Tx(source, begin)
    wanted = _matcher(tables)
    ts = begin.commit_ts
    out: list[OutboxRow] = []
    append = out.append
    for change in changes:
        for d in _event_dicts(tx, change, wanted):
            text = _outbox_encode(d)
            if "\\u0000" in text or "\\ud" in text:
                # NUL or a surrogate escape (a non-BMP character, or a lone surrogate from a
                # json column): jsonb takes neither NUL nor lone surrogates.
                text = _outbox_encode(_jsonb_safe(d))
            append((d["id"], tx.source, d["topic"], text, ts))
    return out


# ASCII-only JSON for the outbox: the C encoder's fastest path; jsonb stores the same value.
_outbox_encode: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_NOT_FOR_JSONB: Final = re.compile("[\x00\ud800-\udfff]")


def _jsonb_safe(value: Any) -> Any:
    """`value` with NUL and lone surrogates (any surrogate code point in a Python str is one)
    replaced by U+FFFD."""
    if isinstance(value, str):
        return _NOT_FOR_JSONB.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_jsonb_safe(k): _jsonb_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonb_safe(v) for v in value]
    return value

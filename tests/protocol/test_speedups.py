"""The optional C decoder (`_speedups.read_row`) against the Python one (`_read_row_py`).

Contract checked: on every message the C function either returns exactly what the Python
decoder returns, or None where the Python decoder raises ProtocolError (which `decode_row` then
raises); it never raises itself and never returns a different value. Messages: every captured
row message (PostgreSQL 15, protocols 1 and 2), generated rows of every kind and op, and every
truncation and single-byte corruption of them.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import struct
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cdc_sync.protocol import ROW_TAGS, UNCHANGED_TOAST, ProtocolError, _decode

from .payloads import payloads
from .test_stream_decode import CAPTURE

RowData = _decode.RowData
FastRow = Callable[[bytes, bool, object], RowData | None]


def _compiler() -> str | None:
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[:1]
    return shutil.which(cc[0]) if cc else None


@pytest.fixture(scope="module")
def fast() -> FastRow:
    """The C function (skips where it could not be built)."""
    try:
        from cdc_sync.protocol._speedups import read_row
    except ImportError:
        pytest.skip("cdc_sync.protocol._speedups is not built (no C compiler at install)")
    return read_row


def test_the_c_decoder_is_built_and_used_where_a_compiler_exists() -> None:
    # Otherwise the suite would quietly test (and CI benchmark) only the Python decoder.
    if _compiler() is None or os.environ.get("CDC_SYNC_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("no C compiler here: the pure-Python decoder is the one installed")
    assert _decode._fast_row is not None, "reinstall (pip install -e .) to build _speedups"
    assert _decode._fast_row.__module__ == "cdc_sync.protocol._speedups"


def test_an_in_place_build_is_not_older_than_its_source(fast: FastRow) -> None:
    # An editable install builds the module next to its source; after the C file changes, only
    # a reinstall (`pip install -e .`, which ./scripts/test does) rebuilds it.
    from cdc_sync.protocol import _speedups

    built = Path(_speedups.__file__)
    source = built.with_name("_speedups.c")
    if source.exists():
        assert built.stat().st_mtime >= source.stat().st_mtime, \
            f"{built.name} is older than _speedups.c: run `pip install -e .` to rebuild it"


def test_without_the_c_decoder_decode_row_is_the_python_one(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _captured_rows()
    expected = [_decode.decode_row(buf, streamed) for buf, streamed in rows]
    monkeypatch.setattr(_decode, "_fast_row", None)
    assert [_decode.decode_row(buf, streamed) for buf, streamed in rows] == expected


def _python(buf: bytes, streamed: bool) -> RowData | ProtocolError:
    try:
        return _decode._read_row_py(buf, streamed)
    except ProtocolError as exc:
        return exc


def _agree(fast: FastRow, buf: bytes, streamed: bool) -> bool:
    """Assert the contract on one message; True when it was a valid row."""
    expected = _python(buf, streamed)
    got = fast(buf, streamed, UNCHANGED_TOAST)
    if isinstance(expected, ProtocolError):
        assert got is None, (buf, streamed, expected, got)
        with pytest.raises(ProtocolError) as info:
            _decode.decode_row(buf, streamed)
        assert (str(info.value), info.value.offset) == (str(expected), expected.offset)
        return False
    assert got == expected, (buf, streamed)
    assert [type(v) for v in got[4] or ()] == [type(v) for v in expected[4] or ()]
    assert [type(v) for v in got[5] or ()] == [type(v) for v in expected[5] or ()]
    assert _decode.decode_row(buf, streamed) == expected
    return True


def _captured_rows() -> list[tuple[bytes, bool]]:
    rows = [(p, False) for s in ("text", "binary") for p in payloads(s) if p[0] in ROW_TAGS]
    rows += [(d.raw, d.block is not None) for d in CAPTURE if d.raw[0] in ROW_TAGS]
    return rows


def test_captured_rows_decode_the_same(fast: FastRow) -> None:
    rows = _captured_rows()
    assert sum(_agree(fast, buf, streamed) for buf, streamed in rows) == len(rows) >= 60


# --- generated rows -------------------------------------------------------------------------

_TEXTS = ["", "0", "-1.5e-300", "NaN", "O'Brien \\ \"q\"", "ünïcödé ✓ 𝄞", "a\tb\nc", "x" * 3000,
          "\x1f\x1e", "{1,NULL,3}"]


def _value(rng: random.Random) -> bytes:
    kind = rng.choice("ttttnub")
    if kind == "n" or kind == "u":
        return kind.encode()
    raw = (rng.choice(_TEXTS).encode() if kind == "t"
           else bytes(rng.randrange(256) for _ in range(rng.randrange(12))))
    return kind.encode() + struct.pack("!I", len(raw)) + raw


def _tuple(rng: random.Random) -> bytes:
    n = rng.choice([0, 1, 2, 4, 7, 40])
    return struct.pack("!h", n) + b"".join(_value(rng) for _ in range(n))


def _row(rng: random.Random) -> tuple[bytes, bool]:
    streamed = rng.random() < 0.5
    tag = rng.choice(b"IUD")
    head = bytes((tag,)) + (struct.pack("!I", rng.randrange(1 << 32)) if streamed else b"")
    head += struct.pack("!I", rng.randrange(1 << 32))
    if tag == ord("I"):
        body = b"N" + _tuple(rng)
    elif tag == ord("D"):
        body = rng.choice([b"K", b"O"]) + _tuple(rng)
    else:
        old = rng.choice([b"", b"K", b"O"])
        body = (old + _tuple(rng) if old else b"") + b"N" + _tuple(rng)
    return head + body, streamed


def _generated(count: int, seed: int) -> Iterator[tuple[bytes, bool]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield _row(rng)


def test_generated_rows_decode_the_same(fast: FastRow) -> None:
    assert all(_agree(fast, buf, streamed) for buf, streamed in _generated(3000, seed=1))


# --- broken rows: None from C, the Python error from decode_row ---------------------------------


def _corruptions(buf: bytes) -> Iterator[bytes]:
    for cut in range(len(buf)):
        yield buf[:cut]
    yield buf + b"\x00"
    yield buf + b"t"
    for i in range(len(buf)):
        for b in (0x00, 0x80, 0xFF, ord("t"), ord("n"), ord("u"), ord("b"), ord("N"), ord("K")):
            if buf[i] != b:
                yield buf[:i] + bytes((b,)) + buf[i + 1:]


def test_every_truncation_and_byte_corruption(fast: FastRow) -> None:
    samples = [r for r in _captured_rows() if len(r[0]) < 400][:25]
    samples += [r for r in _generated(200, seed=2) if len(r[0]) < 200][:40]
    valid = invalid = 0
    for buf, streamed in samples:
        for broken in _corruptions(buf):
            if _agree(fast, broken, streamed):
                valid += 1
            else:
                invalid += 1
    assert valid > 1000 and invalid > 10_000  # both outcomes well exercised


@pytest.mark.parametrize("buf", [
    b"", b"I", b"X" + bytes(20),
    b"I\x00\x00\x00\x01N\xff\xff",  # negative column count
    b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xfe",  # negative length
    b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x02\xc3(",  # invalid UTF-8
    b"I\x00\x00\x00\x01N\x00\x01x",  # unknown kind
    b"U\x00\x00\x00\x01K\x00\x00X\x00\x00",  # neither 'N' after the old key
])
def test_malformed_rows_are_left_to_python(fast: FastRow, buf: bytes) -> None:
    for streamed in (False, True):
        assert fast(buf, streamed, UNCHANGED_TOAST) is None
        with pytest.raises(ProtocolError):
            _decode.decode_row(buf, streamed)


def test_only_bytes_take_the_fast_path(fast: FastRow) -> None:
    buf = b"I\x00\x00\x00\x07N\x00\x01t\x00\x00\x00\x02ok"
    assert fast(buf, False, UNCHANGED_TOAST) == (None, ord("I"), 7, ord("N"), None, ("ok",))
    assert fast(bytearray(buf), False, UNCHANGED_TOAST) is None  # type: ignore[arg-type]
    assert fast(memoryview(buf), False, UNCHANGED_TOAST) is None  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fast(buf)  # type: ignore[call-arg]


def test_unchanged_toast_is_the_object_given(fast: FastRow) -> None:
    buf = b"U\x00\x00\x00\x07N\x00\x02u\x00"[:-1] + b"n"
    row = fast(buf, False, UNCHANGED_TOAST)
    assert row is not None and row[5] is not None
    assert row[5][0] is UNCHANGED_TOAST and row[5][1] is None

"""`Lsn`: a PostgreSQL WAL position, an unsigned 64-bit integer written as `X/Y` in hex."""

from __future__ import annotations

import re

from ._errors import ProtocolError

# pg_lsn_in's grammar: 1 to 8 hex digits, '/', 1 to 8 hex digits. int(x, 16) alone would also
# take '0x1', '+1', '1_0' and inner blanks.
_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


class Lsn(int):
    """A WAL position: `str(Lsn(0x1A2B3C4))` is `'0/1A2B3C4'`, `Lsn.parse` inverts it."""

    __slots__ = ()

    MAX = 0xFFFF_FFFF_FFFF_FFFF

    def __new__(cls, value: int = 0) -> Lsn:
        if not 0 <= value <= cls.MAX:
            raise ValueError(f"LSN out of range: {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse PostgreSQL's `X/Y` notation; raise `ProtocolError` on anything else."""
        match = _LSN_TEXT.fullmatch(text.strip())
        if match is None:
            raise ProtocolError(f"not an LSN: {text!r}", 0)
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFF_FFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


INVALID_LSN = Lsn(0)

"""`Lsn`: a PostgreSQL WAL position, an unsigned 64-bit integer written as `X/Y` in hex."""

from __future__ import annotations

from ._errors import ProtocolError


class Lsn(int):
    """A WAL position. `str(Lsn(0x1A2B3C4))` is `'0/1A2B3C4'`; `Lsn.parse('0/1A2B3C4')` inverts it."""

    __slots__ = ()

    MAX = 0xFFFF_FFFF_FFFF_FFFF

    def __new__(cls, value: int = 0) -> Lsn:
        if not 0 <= value <= cls.MAX:
            raise ValueError(f"LSN out of range: {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse PostgreSQL's `X/Y` notation; raise `ProtocolError` on anything else."""
        hi, sep, lo = text.strip().partition("/")
        try:
            if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
                raise ValueError(text)
            return cls((int(hi, 16) << 32) | int(lo, 16))
        except ValueError:
            raise ProtocolError(f"not an LSN: {text!r}", 0) from None

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFF_FFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


INVALID_LSN = Lsn(0)

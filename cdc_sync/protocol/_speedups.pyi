"""Types of the optional C module (`_speedups.c`): `read_row` is `_decode.decode_row`'s hot path."""

from ._messages import TupleData

def read_row(
    buf: bytes, streamed: bool, toast: object, /
) -> tuple[int | None, int, int, int, TupleData | None, TupleData | None] | None: ...

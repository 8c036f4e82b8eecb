"""The bus message format without a server: packing, chunking, resuming (`bus/_format.py`).

A session of pgoutput messages is made up (transactions of random sizes over three tables,
Relation messages sent once per session as the WAL sender does, some transactions carrying
an origin) and cut with `flush()` at random points, as capture does when the source pauses.
Seeded: `CDC_SYNC_SEED` (an integer or `random`); the seed is in every assertion message.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator

import pytest

from cdc_sync.bus._format import (
    HEADER_CHUNK,
    HEADER_LAST,
    HEADER_PREV,
    HEADER_TX,
    HEADER_TX_LAST,
    Chunk,
    Chunker,
    Resume,
    decode_body,
    span_of,
)

RELS = {relid: b"R" + struct.pack("!I", relid) + b"public\x00t%d\x00d" % relid
        + struct.pack("!H", 0) for relid in (41, 42, 43)}


def _seeds() -> list[int]:
    raw = os.environ.get("CDC_SYNC_SEED")
    if raw == "random":
        return [random.SystemRandom().randrange(2**32)]
    return [int(raw)] if raw else [1, 2, 3, 4, 5, 6, 7, 8]


def begin(commit: int) -> bytes:
    return b"B" + struct.pack("!QQI", commit, 0, 7)


def commit_frame(commit: int, end: int) -> bytes:
    return b"C" + struct.pack("!BQQQ", 0, commit, end, 0)


def insert(relid: int, n: int) -> bytes:
    return b"I" + struct.pack("!I", relid) + b"N" + struct.pack("!H", 1) + b"t" + \
        struct.pack("!I", 8) + b"%08d" % n


Tx = tuple[int, int, list[bytes], bool]  # commit LSN, end LSN, data frames, has an origin


def session(rng: random.Random, n_tx: int) -> tuple[list[bytes], list[Tx]]:
    """The frames of a session, and its transactions."""
    frames: list[bytes] = []
    txs: list[Tx] = []
    sent: set[int] = set()
    lsn, row = 0x1000, 0
    for _ in range(n_tx):
        size = rng.choice([1, 2, 4, 4, 4, 30, 250]) if rng.random() < 0.95 else 2600
        lsn += 0x100 + size * 0x40
        commit, end = lsn, lsn + 0x30
        origin = rng.random() < 0.1
        frames.append(begin(commit))
        if origin:
            frames.append(b"O" + struct.pack("!Q", 1) + b"elsewhere\x00")
        data: list[bytes] = []
        for _ in range(size):
            relid = rng.choice(list(RELS))
            if relid not in sent:
                frames.append(RELS[relid])  # once per session, as the WAL sender does
                sent.add(relid)
            row += 1
            data.append(insert(relid, row))
            frames.append(data[-1])
        frames.append(commit_frame(commit, end))
        txs.append((commit, end, data, origin))
    return frames, txs


def cut(frames: list[bytes], rng: random.Random | None, resume: Resume | None = None,
        chunk_rows: int = 100) -> list[Chunk]:
    """Feed a session; with `rng`, flush at random points (timing), else never."""
    chunker = Chunker(drop_origins=True, chunk_rows=chunk_rows, chunk_bytes=64 * 1024,
                      resume=resume)
    out: list[Chunk] = []
    for frame in frames:
        out.extend(chunker.feed(frame))
        if rng is not None and rng.random() < 0.05:
            out.extend(chunker.flush())
    out.extend(chunker.flush())
    assert not chunker.buffered and not chunker.in_transaction
    return out


def transactions(chunks: list[Chunk], why: str) -> Iterator[tuple[int, list[bytes]]]:
    """Decode messages as an applier does: each message on its own (relations of an earlier
    message of the same transaction kept), yielding (commit LSN, data frames) per commit."""
    open_tx: int | None = None
    data: list[bytes] = []
    known: set[int] = set()
    for chunk in chunks:
        headers = chunk.headers()
        if int(headers[HEADER_CHUNK]) == 0:
            assert open_tx is None, why
            known = set()
        for frame in decode_body(chunk.body()):
            tag = frame[:1]
            if tag == b"R":
                known.add(struct.unpack_from("!I", frame, 1)[0])
            elif tag == b"B":
                open_tx, data = struct.unpack_from("!Q", frame, 1)[0], []
            elif tag == b"I":
                assert struct.unpack_from("!I", frame, 1)[0] in known, \
                    f"{why}: a row without its relation in {chunk.msg_id}"
                data.append(frame)
            elif tag == b"C":
                assert open_tx is not None, why
                yield open_tx, data
                open_tx = None
        assert (open_tx is None) == (headers.get(HEADER_LAST) == "1"), why


def published(txs: list[Tx]) -> list[tuple[int, list[bytes]]]:
    return [(c, data) for c, _e, data, origin in txs if not origin]


@pytest.mark.parametrize("seed", _seeds())
def test_packs_carry_every_transaction_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    frames, txs = session(rng, 300)
    why = f"seed {seed} (CDC_SYNC_SEED={seed} reruns it)"
    chunks = cut(frames, rng)
    assert list(transactions(chunks, why)) == published(txs), why
    packs = [c for c in cut(frames, None) if c.number == 0 and c.last]  # never flushed
    small = [t for t in published(txs) if len(t[1]) <= 4]
    assert len(packs) < len(small) / 2, f"{why}: small transactions were not packed"
    # spans: in commit order, the message ids unique, chunk 0 knows the end before it
    spans = [span_of(c.headers()) for c in chunks]
    assert all(s is not None for s in spans), why
    flat = [x for s in spans if s is not None for x in s]
    assert flat == sorted(flat), why
    assert len({c.msg_id for c in chunks}) == len(chunks), why
    ends = {c: e for c, e, _d, o in txs if not o}
    for chunk in chunks[1:]:
        h = chunk.headers()
        if h[HEADER_CHUNK] == "0":
            assert HEADER_PREV in h, why
    for chunk in chunks:
        h = chunk.headers()
        if HEADER_TX_LAST in h:
            assert chunk.end_lsn == ends[int(h[HEADER_TX_LAST], 16)], why
        assert sum(f[:1] == b"I" for f in chunk.frames) <= 100, why


@pytest.mark.parametrize("seed", _seeds())
def test_a_large_transaction_is_cut_the_same_whatever_came_before(seed: int) -> None:
    """Chunks of a transaction that outgrows a message depend on it alone: packed or not,
    flushed whenever, its chunk n holds the same rows under the same id."""
    rng = random.Random(seed)
    frames, txs = session(rng, 200)
    why = f"seed {seed}"

    def big(chunks: list[Chunk]) -> dict[str, list[bytes]]:
        return {c.msg_id: [f for f in c.frames if f[:1] == b"I"] for c in chunks
                if c.last_commit is None and not (c.number == 0 and c.last)}

    assert big(cut(frames, rng)) == big(cut(frames, None)) == big(cut(frames, random.Random(
        seed + 1))), why


@pytest.mark.parametrize("seed", _seeds())
def test_resuming_publishes_exactly_what_follows_the_stream(seed: int) -> None:
    """Capture restarted from the slot re-reads transactions the stream holds; given the
    stream's last message, it publishes only what follows it, packed differently or not."""
    rng = random.Random(seed)
    frames, txs = session(rng, 200)
    why = f"seed {seed}"
    first = cut(frames, rng)
    for at in sorted(rng.sample(range(len(first)), 12)):
        stream = first[:at + 1]
        again = cut(frames, rng, Resume.of(stream[-1].headers()))
        assert list(transactions(stream + again, why)) == published(txs), \
            f"{why}: resumed after message {at} ({stream[-1].msg_id})"
        if again:
            last = span_of(stream[-1].headers())
            nxt = span_of(again[0].headers())
            assert last is not None and nxt is not None and nxt[0] >= last[1], why


def test_a_session_resumed_inside_a_transaction_continues_its_chunks() -> None:
    rng = random.Random(11)
    frames, txs = session(rng, 5)
    frames = frames + [begin(0x90000), RELS[41]] + [insert(41, 10**6 + i) for i in range(250)] \
        + [commit_frame(0x90000, 0x90030)]
    txs.append((0x90000, 0x90030, [insert(41, 10**6 + i) for i in range(250)], False))
    first = cut(frames, None)
    chunk1 = next(c for c in first if c.msg_id == "90000:1")
    again = cut(frames, None, Resume.of(chunk1.headers()))
    assert [c.msg_id for c in again] == ["90000:2"]
    stream = first[:first.index(chunk1) + 1] + again
    assert list(transactions(stream, "resumed")) == published(txs)
    assert Resume.of({HEADER_TX: "10"}) == Resume(0x10, 0, False)
    assert Resume.of({"Nats-Msg-Id": "x"}) is None


def test_a_relation_changed_inside_a_moved_transaction_keeps_the_old_one_first() -> None:
    """A transaction's first rows used the Relation sent in the pack before it; then the
    table changed (a new Relation) inside it. Moved to a message of its own, it carries the
    old Relation before its first rows, the new one where the server sent it."""
    old = RELS[41]
    new = b"R" + struct.pack("!I", 41) + b"public\x00t41\x00f" + struct.pack("!H", 0)
    chunker = Chunker(drop_origins=True, chunk_rows=100)
    out: list[Chunk] = []
    for frame in [begin(0x100), old, insert(41, 1), commit_frame(0x100, 0x130),
                  begin(0x200), insert(41, 2), new, insert(41, 3)]:
        out += chunker.feed(frame)
    out += chunker.flush()  # the pack goes; the open transaction moves to a message of its own
    out += chunker.feed(commit_frame(0x200, 0x230))
    out += chunker.flush()
    assert [c.msg_id for c in out] == ["100:0", "200:0"]
    frames = out[1].frames
    assert frames.index(old) < frames.index(insert(41, 2)) < frames.index(new) \
        < frames.index(insert(41, 3))


def test_a_hole_in_the_delivery_sequence_ends_the_reading() -> None:
    """nats-py can drop messages (past its pending limit) and AckAll would then acknowledge
    past them: the consumer raises instead of returning messages after a hole."""
    import asyncio
    from types import SimpleNamespace
    from typing import Any

    from cdc_sync.bus.client import BusError, Consumer

    def message(consumer_seq: int) -> Any:
        async def ack() -> None:
            pass
        seq = SimpleNamespace(consumer=consumer_seq, stream=100 + consumer_seq)
        return SimpleNamespace(metadata=SimpleNamespace(sequence=seq), headers={},
                               data=b"x", ack=ack)

    class Sub:
        def __init__(self, batches: list[list[int]]) -> None:
            self.batches = batches

        async def fetch(self, n: int, timeout: float) -> list[Any]:
            return [message(c) for c in self.batches.pop(0)]

    client = SimpleNamespace(stream="S", _run=lambda coro, _t=None: asyncio.run(coro))
    consumer = Consumer(client, Sub([[1, 2, 3], [4, 5], [7, 8]]))  # type: ignore[arg-type]
    assert [m.seq for m in consumer.fetch(64, 0.5)] == [101, 102, 103]
    assert [m.seq for m in consumer.fetch(64, 0.5)] == [104, 105]
    with pytest.raises(BusError, match="delivery 7 came after 5"):
        consumer.fetch(64, 0.5)

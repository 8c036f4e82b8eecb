"""`_resolving._decide` decides plain inserts and updates itself (`_plain_successors`): on
random chunks against random site states, under every built-in strategy, with and without a
version column, REPLICA IDENTITY DEFAULT and FULL, key-changing updates, unchanged TOAST and
tombstones, the end state and the conflict log equal what the policy decides for every change
(randomised, seeded; the seed is in every failure)."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from cdc_sync.changes import UNCHANGED_TOAST, Change, Op, Table, TxBegin
from cdc_sync.protocol import Lsn, ReplicaIdentity
from cdc_sync.resolve import Incoming, LocalRow, PolicyResolver, Tombstone
from cdc_sync.sinks import _resolving
from cdc_sync.sinks._resolving import _decide, _State
from cdc_sync.sinks._sql import SiteTable

T0 = datetime(2026, 12, 7, tzinfo=UTC)
OFFICES = ("berlin", "tokyo", "site")
SOURCE = "berlin"


def _seeds() -> list[int]:
    env = os.environ.get("CDC_SYNC_SEED")
    if env == "random":
        return [random.randrange(1 << 30) for _ in range(100)]
    if env:
        return [int(env)]
    return list(range(100))


def _merge(local: dict[str, Any] | None, incoming: dict[str, Any] | None,
           change: Incoming) -> dict[str, Any] | None:
    if incoming is None:
        return None
    return {**(local or {}), **incoming, "note": "merged"}


def _table(identity: ReplicaIdentity) -> Table:
    return Table(1, "public", "grants", ("id", "amount", "note", "v"), (23, 1700, 25, 23),
                 (-1, -1, -1, -1), (0,), identity)


def _row(rng: random.Random, k: str) -> dict[str, str | None]:
    return {"id": k, "amount": str(rng.randrange(100)), "note": rng.choice(["a", "b", None]),
            "v": str(rng.randrange(5))}


def _state(rng: random.Random, keys: list[str]) -> _State:
    seen: dict[tuple[Any, ...], LocalRow] = {}
    tombs: dict[tuple[Any, ...], Tombstone] = {}
    for k in keys:
        r = rng.random()
        ts = T0 + timedelta(seconds=rng.randrange(4)) if rng.random() < 0.9 else None
        origin = rng.choice(OFFICES)
        if r < 0.55:
            seen[(k,)] = LocalRow(_row(rng, k), ts, origin)
            if rng.random() < 0.1:  # a row with a leftover tombstone
                tombs[(k,)] = Tombstone(T0 + timedelta(seconds=rng.randrange(20)), None,
                                        rng.choice(OFFICES))
        elif r < 0.8:
            tombs[(k,)] = Tombstone(T0 + timedelta(seconds=rng.randrange(20)),
                                    rng.choice([None, str(rng.randrange(5))]),
                                    rng.choice(["", "tokyo", "berlin"]))
    return _State(seen, tombs, {(k,): f'{{"id":"{k}"}}' for k in keys})


def _changes(rng: random.Random, table: Table, keys: list[str], full: bool) -> list[Change]:
    out: list[Change] = []
    for pos in range(rng.randrange(1, 30)):
        k = rng.choice(keys)
        new = (k, str(rng.randrange(100)), rng.choice(["x", "y", None]), str(rng.randrange(6)))
        r = rng.random()
        if r < 0.3:
            out.append(Change(Op.INSERT, pos, table, new=new))
        elif r < 0.8:
            old: tuple[Any, ...] | None = None
            old_is_key = False
            if full and rng.random() < 0.8:
                old = (k, str(rng.randrange(100)), rng.choice(["a", "b", None]),
                       str(rng.randrange(5)))
            elif rng.random() < 0.15:  # the key changes
                old, old_is_key = (k, None, None, None), True
                new = (rng.choice(keys), *new[1:])
            if rng.random() < 0.2:
                new = (*new[:2], UNCHANGED_TOAST, new[3])
            out.append(Change(Op.UPDATE, pos, table, new=new, old=old, old_is_key=old_is_key))
        else:
            if full:
                out.append(Change(Op.DELETE, pos, table, old=(k, "1", "a", str(rng.randrange(5)))))
            else:
                out.append(Change(Op.DELETE, pos, table, old=(k, None, None, None),
                                  old_is_key=True))
    return out


def _outcome(state: _State, conflicts: list[Any]) -> Any:
    return (state.rows, state.tombs, list(state.written), list(state.tomb_changed),
            [(c.key, c.kind, c.local, c.incoming, c.outcome) for c in conflicts])


@pytest.mark.parametrize("seed", _seeds())
def test_plain_cases_decide_as_the_policy(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    full = rng.random() < 0.4
    table = _table(ReplicaIdentity.FULL if full else ReplicaIdentity.DEFAULT)
    st = SiteTable(table, ("integer", "numeric", "text", "integer"), (0,), True)
    strategy = rng.choice(["lww", "first_write_wins", "source_wins", "merge"])
    resolver = PolicyResolver(
        "public.grants", strategy, version_column=rng.choice([None, "v"]),
        counters=("amount",) if full and rng.random() < 0.3 else (), site="site",
        merge=_merge if strategy == "merge" else None)
    keys = [str(i) for i in range(rng.randrange(1, 25))]
    begins = {}
    changes = _changes(rng, table, keys, full)
    for ch in changes:
        begins[id(ch)] = TxBegin(ch.position, Lsn(1000 + ch.position),
                                 T0 + timedelta(seconds=rng.randrange(5)), None)
    ctx = SimpleNamespace(source=SOURCE, begin_for=lambda ch, default: begins[id(ch)])
    initial = _state(rng, keys)

    def run(fast: bool) -> Any:
        state = _State(dict(initial.seen), dict(initial.tombs_read), dict(initial.key_json))
        if not fast:
            monkeypatch.setattr(_resolving, "_plain_successors", lambda r: (False, False))
        try:
            conflicts = _decide(ctx, state, st, changes, None, resolver)  # type: ignore[arg-type]
        finally:
            monkeypatch.undo()
        return _outcome(state, conflicts)

    assert run(True) == run(False), f"seed {seed} ({strategy}, {resolver!r}, full={full})"


def test_the_plain_path_is_taken() -> None:
    """The differential test above means something only if the plain path runs: a chunk of
    plain inserts and updates never calls the resolver."""
    table = _table(ReplicaIdentity.DEFAULT)
    st = SiteTable(table, ("integer", "numeric", "text", "integer"), (0,), True)

    class Counting(PolicyResolver):
        calls = 0

        def resolve(self, *args: Any) -> Any:
            Counting.calls += 1
            return super().resolve(*args)

    begin = TxBegin(1, Lsn(10), T0 + timedelta(seconds=30), None)
    seen = {("1",): LocalRow(_row(random.Random(1), "1"), T0, "site")}
    changes = [Change(Op.INSERT, 0, table, new=("2", "1", "x", "1")),
               Change(Op.UPDATE, 1, table, new=("1", "5", "y", "1")),
               Change(Op.UPDATE, 2, table, new=("2", "6", "z", "1"))]
    ctx = SimpleNamespace(source=SOURCE, begin_for=lambda ch, default: default)
    for resolver, calls in ((PolicyResolver("public.grants", "lww", site="site"), 0),
                            (Counting("public.grants", "lww", site="site"), 3)):
        Counting.calls = 0
        state = _State(dict(seen), {}, {("1",): '{"id":"1"}', ("2",): '{"id":"2"}'})
        assert _decide(ctx, state, st, changes, begin, resolver) == []  # type: ignore[arg-type]
        assert Counting.calls == calls
        assert state.rows[("1",)] == LocalRow(
            {"id": "1", "amount": "5", "note": "y", "v": "1"}, begin.commit_ts, SOURCE)
        assert state.rows[("2",)].values["amount"] == "6"  # type: ignore[union-attr]

"""The decision table of README.md ("Conflicts and multi-directional sync"), one case per cell,
and the ordering rules that make every office decide alike.

Cells: incoming insert / update / delete x the site's state for the key (a row, nothing, a
tombstone) x strategy (lww on a version column, lww on commit time, first_write_wins, merge,
counters): one test case per cell (id `op-state-strategy`), which checks the incoming change
newer than the site's state and older (concurrent: the site's row is not the row the change
started from), and for an update or delete meeting a row, one made on top of that very row.

Then: the production bug (a key-only delete of the very version a site holds lost), deletes
dated by their commit time, ties, same-office delete and re-insert, and two seeded property
tests (seed printed on failure; `CDC_SYNC_SEED` replays one): random writes at three offices,
delivered in random orders, end identical at every office, and concurrent writes from one
common state end as the write with the highest key.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cdc_sync.changes import Op
from cdc_sync.resolve import Decision, Incoming, LocalRow, PolicyResolver, Tombstone

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SITE = "tokyo"
Row = dict[str, str | None]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    """A version-column value (timestamptz text) `seconds` after T0."""
    return at(seconds).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def merge_fn(local: Row | None, incoming: Row | None, _change: Incoming) -> Mapping[str, Any] | None:
    base = local or incoming
    if base is None:
        return None
    return {**base, "note": "merged"}


STRATEGIES = ("lww_version", "lww_commit", "fww", "merge", "counters")


def make(strategy: str) -> PolicyResolver:
    if strategy == "lww_version":
        return PolicyResolver("public.grants", "lww", version_column="v", site=SITE)
    if strategy == "lww_commit":
        return PolicyResolver("public.grants", "lww", site=SITE)
    if strategy == "fww":
        return PolicyResolver("public.grants", "first_write_wins", site=SITE)
    if strategy == "merge":
        return PolicyResolver("public.grants", "merge", site=SITE, merge=merge_fn)
    return PolicyResolver("public.grants", "lww", counters=("amount",), site=SITE)


def row(amount: str, t: float, note: str = "x") -> Row:
    return {"id": "1", "amount": amount, "note": note, "v": stamp(t)}


BASE = row("100", 0, "base")  # what both sides started from


def state_row(t: float) -> LocalRow:
    """The site's row: changed concurrently (amount 130) at time t by washington."""
    return LocalRow(row("130", t, "local"), at(t), "washington")


def state_tomb(t: float) -> Tombstone:
    return Tombstone(at(t), stamp(0), "washington")


def incoming(op: str, t: float) -> Incoming:
    """berlin's change at time t, made from BASE (REPLICA IDENTITY FULL: old is BASE)."""
    if op == "insert":
        return Incoming(Op.INSERT, row("150", t, "in"), None, False, at(t), "berlin", {"id": "1"})
    if op == "update":
        return Incoming(Op.UPDATE, row("150", t, "in"), dict(BASE), True, at(t), "berlin",
                        {"id": "1"})
    return Incoming(Op.DELETE, None, dict(BASE), True, at(t), "berlin", {"id": "1"})


# (op, state, strategy, when) -> (action, conflict kind, outcome, reason)
W, S, D = "write", "skip", "delete"
_ROW = {
    ("insert", "lww"): {"newer": (W, "insert_insert", "incoming_wins", "newer write wins"),
                        "older": (S, "insert_insert", "local_wins", "newer local row kept")},
    ("insert", "fww"): {"newer": (S, "insert_insert", "local_wins", "earlier row kept"),
                        "older": (W, "insert_insert", "incoming_wins", "earlier write wins")},
    ("insert", "merge"): {"newer": (W, "insert_insert", "merged", "merge function's row"),
                          "older": (W, "insert_insert", "merged", "merge function's row")},
    ("update", "lww"): {"newer": (W, "update_update", "incoming_wins", "newer write wins"),
                        "older": (S, "update_update", "local_wins", "newer local row kept")},
    ("update", "fww"): {"newer": (S, "update_update", "local_wins", "earlier row kept"),
                        "older": (W, "update_update", "incoming_wins", "earlier write wins")},
    ("update", "merge"): {"newer": (W, "update_update", "merged", "merge function's row"),
                          "older": (W, "update_update", "merged", "merge function's row")},
    ("update", "counters"): {
        "newer": (W, "update_update", "incoming_wins", "newer wins, amount += delta"),
        "older": (W, "update_update", "local_wins", "local kept, amount += delta")},
    ("delete", "lww"): {"newer": (D, "delete_update", "deleted", "newer delete wins"),
                        "older": (S, "delete_update", "local_wins", "newer local row kept")},
    ("delete", "fww"): {"newer": (D, "delete_update", "deleted", "deletes win over updates"),
                        "older": (D, "delete_update", "deleted", "deletes win over updates")},
    ("delete", "merge"): {"newer": (W, "delete_update", "merged", "merge function's row"),
                          "older": (W, "delete_update", "merged", "merge function's row")},
}
_ABSENT = {
    "insert": (W, None, "applied", "nothing to conflict with"),
    "update": (W, "update_missing", "incoming_wins", "whole row sent: written"),
    "delete": (D, "delete_missing", "deleted", "tombstone recorded"),
}
_TOMB = {
    ("insert", "lww"): {"newer": (W, None, "applied", "newer than the delete"),
                        "older": (S, "insert_deleted", "kept_deleted", "the delete is newer")},
    ("update", "lww"): {"newer": (W, "update_delete", "incoming_wins", "newer than the delete"),
                        "older": (S, "update_delete", "kept_deleted", "the delete is newer")},
    ("update", "fww"): {"newer": (S, "update_delete", "kept_deleted", "deletes win over updates"),
                        "older": (S, "update_delete", "kept_deleted", "deletes win over updates")},
    ("update", "merge"): {"newer": (W, "update_delete", "merged", "merge function's row"),
                          "older": (W, "update_delete", "merged", "merge function's row")},
    ("insert", "merge"): {"newer": (W, None, "applied", "newer than the delete"),
                          "older": (W, "insert_deleted", "merged", "merge function's row")},
    ("delete", "lww"): {"newer": (D, "delete_missing", "deleted", "newer tombstone kept"),
                        "older": (S, "delete_missing", "kept_deleted", "newer tombstone kept")},
}


def expected(op: str, state: str, strategy: str, when: str) -> tuple[str, str | None, str, str]:
    family = {"lww_version": "lww", "lww_commit": "lww", "counters": "lww"}.get(strategy, strategy)
    if state == "absent":
        if strategy == "merge" and op == "update":
            return (W, "update_missing", "merged", "merge function's row")
        return _ABSENT[op]
    table = _ROW if state == "row" else _TOMB
    if (op, strategy) in table:
        return table[(op, strategy)][when]
    if (op, family) in table:
        return table[(op, family)][when]
    # first_write_wins: inserts and deletes against a tombstone are decided as in lww.
    return table[(op, "lww")][when]


CELLS = [(op, state, strategy) for op in ("insert", "update", "delete")
         for state in ("row", "absent", "tombstone") for strategy in STRATEGIES]


def _follows_expected(op: str, strategy: str) -> tuple[str, str | None, str, str]:
    """A change made on top of the site's row (its full `old` is that row): no conflict."""
    return (D if op == "delete" else W, None, "applied", "made on top of the row")


@pytest.mark.parametrize(("op", "state", "strategy"), CELLS,
                         ids=[f"{o}-{s}-{g}" for o, s, g in CELLS])
def test_decision_table_cell(op: str, state: str, strategy: str) -> None:
    """One README cell: the incoming change newer than the site's state, then older (and, for
    an update or delete meeting a row, once made on top of that very row)."""
    r = make(strategy)
    scenarios = ["newer", "older"]
    if state == "row" and op != "insert":
        scenarios.append("follows")
    for when in scenarios:
        t_state, t_in = (10, 20) if when != "older" else (20, 10)
        local = state_row(t_state) if state == "row" else None
        if when == "follows":
            local = LocalRow(dict(BASE), at(t_state), "washington")
        tomb = state_tomb(t_state) if state == "tombstone" else None
        d = r.resolve(local, incoming(op, t_in), tomb)
        if when == "follows":
            action, conflict, outcome, reason = _follows_expected(op, strategy)
        else:
            action, conflict, outcome, reason = expected(op, state, strategy, when)
        assert (d.action, d.conflict, d.outcome) == (action, conflict, outcome), (when, reason, d)
        assert (d.row is not None) == (d.action == "write")
        if strategy == "counters" and op == "update" and state == "row":
            base = "100" if when == "follows" else "130"
            assert d.row is not None and d.row["amount"] == str(int(base) + 50), \
                "local + (150 - 100)"
        if d.action == "delete":
            assert d.tombstone is not None and d.tombstone.deleted_at == at(t_in)
            assert d.tombstone.origin == "berlin"


# -- the rules behind the table -------------------------------------------------------------------

def test_key_only_delete_of_the_version_held_wins() -> None:
    """The production bug: REPLICA IDENTITY DEFAULT, lww on updated_at. berlin deletes the row
    at version 38.389 (committed at 43.905); the site holds exactly that version. The delete
    carries only the key; it is dated by its commit time and must win."""
    r = make("lww_version")
    held = LocalRow(row("100", 38.389), at(38.4), "washington")
    delete = Incoming(Op.DELETE, None, {"id": "1"}, False, at(43.905), "berlin", {"id": "1"})
    d = r.resolve(held, delete, None)
    assert (d.action, d.conflict, d.outcome) == ("delete", None, "applied")
    assert d.tombstone == Tombstone(at(43.905), None, "berlin")


def test_delete_dated_by_commit_time_against_concurrent_updates() -> None:
    r = make("lww_version")
    delete = Incoming(Op.DELETE, None, {"id": "1"}, False, at(50), "berlin", {"id": "1"})
    older = LocalRow(row("1", 45), at(45), "washington")
    newer = LocalRow(row("1", 55), at(55), "washington")
    assert r.resolve(older, delete, None).action == "delete"
    d = r.resolve(newer, delete, None)
    assert (d.action, d.outcome) == ("skip", "local_wins")
    # ... and the same pair decided the other way round (the update arriving at the office
    # whose row was deleted) agrees.
    tomb = Tombstone(at(50), None, "berlin")
    upd_old = Incoming(Op.UPDATE, row("1", 45), None, False, at(45), "washington", {"id": "1"})
    upd_new = Incoming(Op.UPDATE, row("1", 55), None, False, at(55), "washington", {"id": "1"})
    assert r.resolve(None, upd_old, tomb).outcome == "kept_deleted"
    assert r.resolve(None, upd_new, tomb).action == "write"


def test_local_tombstone_of_a_key_only_table_is_dated_like_its_delete() -> None:
    """A local delete's tombstone holds the deleted version (the trigger has it). Receivers of
    a key-only delete date it by its commit time only, so this office must too: an update
    with a version between the deleted one and the commit time beats neither side's delete."""
    r = make("lww_version")
    local_tomb = Tombstone(at(50), stamp(60), "")  # deleted a row stamped in the future
    upd = Incoming(Op.UPDATE, row("1", 55), None, False, at(55), "washington", {"id": "1"})
    assert r.resolve(None, upd, local_tomb).action == "write", "dated 50 as the others see it"
    held = LocalRow(row("1", 55), at(55), "washington")
    delete = Incoming(Op.DELETE, None, {"id": "1"}, False, at(50), "tokyo", {"id": "1"})
    assert r.resolve(held, delete, None).action == "skip", "the other offices agree"


def test_full_delete_beats_every_write_of_the_version_it_deleted() -> None:
    r = make("lww_version")
    held = LocalRow(row("1", 30), at(30), "zz-last")  # origin name larger than the deleter's
    delete = Incoming(Op.DELETE, None, row("1", 30), True, at(30), "aa-first", {"id": "1"})
    assert r.resolve(held, delete, None).action == "delete"


@pytest.mark.parametrize("column", [None, "v"], ids=["commit_time", "version_column"])
def test_ties_break_by_origin_name_at_every_office(column: str | None) -> None:
    """berlin and tokyo write the same key at the same version (same commit time, same
    updated_at). Whichever office decides, and in whichever order washington gets them, tokyo
    (the larger name) wins; a delete of that version would beat both."""
    def resolver(site: str) -> PolicyResolver:
        return PolicyResolver("public.grants", "lww", version_column=column, site=site)

    def write(office: str) -> Incoming:
        return Incoming(Op.INSERT, row("1", 5, office), None, False, at(5), office, {"id": "1"})

    from_berlin, from_tokyo = write("berlin"), write("tokyo")
    berlin_own = LocalRow(row("1", 5, "berlin"), at(5), "")  # berlin's own write, at berlin
    tokyo_own = LocalRow(row("1", 5, "tokyo"), at(5), "")
    d = resolver("berlin").resolve(berlin_own, from_tokyo, None)
    assert (d.action, d.conflict, d.outcome) == ("write", "insert_insert", "incoming_wins")
    d = resolver("tokyo").resolve(tokyo_own, from_berlin, None)
    assert (d.action, d.conflict, d.outcome) == ("skip", "insert_insert", "local_wins")
    w = resolver("washington")
    for first, second in ((from_berlin, from_tokyo), (from_tokyo, from_berlin)):
        d1 = w.resolve(None, first, None)
        held = d1.local_after(None, first)
        d2 = w.resolve(held, second, None)
        final = d2.local_after(held, second)
        assert final is not None and final.values["note"] == "tokyo"
    # A delete at the same version, from the smaller name, still beats both writes (full old:
    # the deleted row's version is known; key-only, its commit time equals it).
    for full in (True, False):
        old = row("1", 5, "berlin") if full else {"id": "1"}
        delete = Incoming(Op.DELETE, None, old, full, at(5), "aachen", {"id": "1"})
        for site, held in (("berlin", berlin_own), ("tokyo", tokyo_own)):
            d = resolver(site).resolve(held, delete, None)
            assert d.action == "delete", (site, full, d)
            tomb = d.tombstone_after(None)
            assert tomb is not None
            late = resolver(site).resolve(None, from_tokyo if site == "berlin" else from_berlin,
                                          tomb)
            assert (late.action, late.outcome) == ("skip", "kept_deleted"), (site, full, late)


def test_key_only_delete_on_an_integer_version_deletes_what_it_finds() -> None:
    """Integer versions do not compare with a commit time: a key-only delete removes the row the
    site holds and records that row's version, so a later write (higher version) revives the
    key and an older one does not."""
    r = PolicyResolver("public.grants", "lww", version_column="v", site=SITE)
    held = LocalRow({"id": "1", "amount": "1", "note": "x", "v": "7"}, at(99), "washington")
    delete = Incoming(Op.DELETE, None, {"id": "1"}, False, at(10), "berlin", {"id": "1"})
    d = r.resolve(held, delete, None)
    assert (d.action, d.conflict, d.outcome) == ("delete", None, "applied")
    assert d.tombstone == Tombstone(at(10), "7", "berlin")

    def ins(v: str) -> Incoming:
        return Incoming(Op.INSERT, {"id": "1", "amount": "2", "note": "y", "v": v}, None, False,
                        at(20), "washington", {"id": "1"})

    assert r.resolve(None, ins("8"), d.tombstone).outcome == "applied"
    assert r.resolve(None, ins("7"), d.tombstone).outcome == "kept_deleted"  # delete-first tie


def test_same_origin_delete_then_insert_in_one_transaction() -> None:
    r = make("lww_version")
    held = LocalRow(row("1", 10), at(10), "berlin")
    delete = Incoming(Op.DELETE, None, {"id": "1"}, False, at(20), "berlin", {"id": "1"})
    d = r.resolve(held, delete, None)
    assert d.action == "delete"
    again = Incoming(Op.INSERT, row("2", 19), None, False, at(20), "berlin", {"id": "1"})
    d2 = r.resolve(None, again, d.tombstone_after(None))
    assert d2.action == "write", "the same office's later change always wins"


# -- property: three offices end identical --------------------------------------------------------

OFFICES = ("berlin", "tokyo", "washington")


@dataclass
class Site:
    """One office's state of one key: its row (with writer time and origin) or tombstone."""

    name: str
    row: LocalRow | None = None
    tomb: Tombstone | None = None
    inbox: dict[str, list[Incoming]] = field(default_factory=dict)


def _local_write(site: Site, rng: random.Random, t: float, mode: str, full: bool, n: int
                 ) -> Incoming:
    """A write at `site` itself at time t (always succeeds there, as the office's own write);
    the change its stream carries to the other offices. A write is newer than what its office
    holds: updated_at is the clock just before the commit, an integer version is bumped."""
    if mode == "integer":
        held = site.row.values["v"] if site.row else site.tomb.version if site.tomb else None
        version = str(int(held or "0") + 1)
    else:
        version = stamp(t - 0.0001)
    new = {"id": "1", "amount": str(n), "note": site.name, "v": version}
    if site.row is None:
        site.row, site.tomb = LocalRow(new, at(t), ""), None
        return Incoming(Op.INSERT, new, None, False, at(t), site.name, {"id": "1"},
                        identity_full=full)
    old = dict(site.row.values)
    if rng.random() < 0.35:
        site.row = None
        site.tomb = Tombstone(at(t), old["v"], "")  # the trigger keeps the deleted version
        return Incoming(Op.DELETE, None, old if full else {"id": "1"}, full, at(t), site.name,
                        {"id": "1"}, identity_full=full)
    site.row = LocalRow(new, at(t), "")
    return Incoming(Op.UPDATE, new, old if full else None, full, at(t), site.name, {"id": "1"},
                    identity_full=full)


def _receive(site: Site, r: PolicyResolver, change: Incoming) -> None:
    d: Decision = r.resolve(site.row, change, site.tomb)
    site.row, site.tomb = d.local_after(site.row, change), d.tombstone_after(site.tomb)
    if site.row is not None:
        site.tomb = None  # a row written again: its tombstone goes (as the applier does)


def _run(seed: int, mode: str, full: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    sites = {o: Site(o, inbox={p: [] for p in OFFICES if p != o}) for o in OFFICES}
    column = None if mode == "commit_time" else "v"
    resolvers = {o: PolicyResolver("public.grants", "lww", version_column=column, site=o)
                 for o in OFFICES}
    t = 1.0
    for n in range(rng.randint(5, 40)):
        if rng.random() < 0.5:
            office = rng.choice(OFFICES)
            t += rng.choice((0.001, 0.01, 0.5))
            change = _local_write(sites[office], rng, t, mode, full, n)
            for other in OFFICES:
                if other != office:
                    sites[other].inbox[office].append(change)
        else:  # deliver the next change of some office to some other office
            office = rng.choice(OFFICES)
            pending = [p for p, q in sites[office].inbox.items() if q]
            if pending:
                src = rng.choice(pending)
                _receive(sites[office], resolvers[office], sites[office].inbox[src].pop(0))
    for office in OFFICES:  # deliver the rest, in a random interleaving
        while any(sites[office].inbox.values()):
            src = rng.choice([p for p, q in sites[office].inbox.items() if q])
            _receive(sites[office], resolvers[office], sites[office].inbox[src].pop(0))
    return {o: (dict(s.row.values) if s.row else "deleted" if s.tomb else None)
            for o, s in sites.items()}


@pytest.mark.parametrize(("mode", "full"), [
    ("version", False), ("version", True), ("commit_time", False), ("commit_time", True),
    ("integer", True),  # integer versions need REPLICA IDENTITY FULL (README)
], ids=["timestamp-version-key-only", "timestamp-version-full", "commit-time-key-only",
        "commit-time-full", "integer-version-full"])
def test_three_offices_converge_whatever_the_delivery_order(mode: str, full: bool) -> None:
    seed_env = os.environ.get("CDC_SYNC_SEED", "random")
    first = random.randrange(1 << 30) if seed_env == "random" else int(seed_env)
    for seed in range(first, first + 400):
        final = _run(seed, mode, full)
        assert len({repr(v) for v in final.values()}) == 1, \
            f"seed {seed} (CDC_SYNC_SEED={seed}): offices differ: {final}"


def test_identity_full_tells_how_to_read_a_local_tombstone_for_inserts() -> None:
    """An insert never has `old`, so `old_is_full` cannot say whether the table's deletes
    travel in full; `Incoming.identity_full` does (the applier knows the replica identity)."""
    r = make("lww_version")
    local_tomb = Tombstone(at(50), stamp(60), "")  # deleted a row stamped ahead of the commit
    key_only = Incoming(Op.INSERT, row("1", 55), None, False, at(55), "berlin", {"id": "1"})
    full = Incoming(Op.INSERT, row("1", 55), None, False, at(55), "berlin", {"id": "1"},
                    identity_full=True)
    assert not key_only.deletes_full and full.deletes_full
    assert r.resolve(None, key_only, local_tomb).action == "write", "others date it 50"
    d = r.resolve(None, full, local_tomb)
    assert (d.action, d.outcome) == ("skip", "kept_deleted"), "others date it 60 (max(V, C))"


def test_local_wins_counter_write_keeps_the_local_key() -> None:
    r = make("counters")
    mine = LocalRow(row("130", 20, "local"), at(20), "")
    change = Incoming(Op.UPDATE, row("150", 10, "in"), dict(BASE), True, at(10), "berlin",
                      {"id": "1"})
    d = r.resolve(mine, change, None)
    assert (d.action, d.outcome) == ("write", "local_wins")
    after = d.local_after(mine, change)
    assert after is not None and (after.commit_ts, after.origin) == (at(20), "")
    assert after.values["amount"] == "180"


def test_delete_version() -> None:
    from cdc_sync.resolve import delete_version, parse_version, timestamp_version

    assert delete_version(None, at(5)) == timestamp_version(at(5))
    assert delete_version(stamp(3), at(5)) == timestamp_version(at(5))
    assert delete_version(stamp(9), at(5)) == parse_version(stamp(9))  # stamped ahead
    assert delete_version("7", at(5)) == parse_version("7")
    assert delete_version("abc", at(5)) == parse_version("abc")


# -- property: concurrent writes from one common state, the brief's model -------------------------

_Key = tuple[Any, int, str]


def _oracle_key(op: Op, values: Row | None, deleted: Row | None, c: float, office: str,
                mode: str, full: bool) -> _Key:
    """The spec's ordering key of one write, computed independently of the resolver."""
    from cdc_sync.resolve import delete_version, parse_version, timestamp_version

    if op is Op.DELETE:
        if mode == "commit_time":
            return timestamp_version(at(c)), 1, office
        assert deleted is not None
        return delete_version(deleted["v"] if full else None, at(c)), 1, office
    assert values is not None
    if mode == "commit_time":
        return timestamp_version(at(c)), 0, office
    return parse_version(values["v"]), 0, office


@dataclass
class _Write:
    change: Incoming
    key: _Key
    result: Row | None  # the row it leaves; None: deleted


def _version_text(rng: random.Random, mode: str) -> str:
    if mode == "integer":
        return str(rng.randint(1, 6))
    return stamp(rng.randint(1, 8))  # an application clock: independent of commit times


def _concurrent_run(seed: int, mode: str, full: bool) -> None:
    """Every office starts from the same state (a row, a tombstone or nothing, last written by
    one office or by a fourth one everyone has heard), makes 0-3 writes of its own on top of
    what it holds, each newer than that (it saw it), with random versions and commit times from
    small ranges (ties across offices are common). Each office applies its own writes first
    (they are local: they always happen), then the others' streams in a random interleaving.
    All end identical, and equal to the write with the highest key."""
    rng = random.Random(seed)
    column = None if mode == "commit_time" else "v"
    start_origin = rng.choice((*OFFICES, "hq"))
    start_kind = rng.choice(("row", "tombstone", "absent"))
    v0 = "0" if mode == "integer" else stamp(0)
    start_row: Row = {"id": "1", "amount": "0", "note": "start", "v": v0}
    start_key: _Key | None = None
    if start_kind == "row":
        start_key = _oracle_key(Op.INSERT, start_row, None, 0, start_origin, mode, full)
    elif start_kind == "tombstone":
        start_key = _oracle_key(Op.DELETE, None, start_row, 0, start_origin, mode, full)

    def start_state(site: str) -> Site:
        origin = "" if site == start_origin else start_origin
        s = Site(site)
        if start_kind == "row":
            s.row = LocalRow(dict(start_row), at(0), origin)
        elif start_kind == "tombstone":
            # The trigger keeps the deleted version; the applier records what the delete carried.
            known = origin == "" or full or mode == "integer"
            s.tomb = Tombstone(at(0), v0 if known and column else None, origin)
        return s

    streams: dict[str, list[_Write]] = {}
    for office in OFFICES:
        held_row = dict(start_row) if start_kind == "row" else None
        held_key = start_key
        c = 0.0
        writes: list[_Write] = []
        for n in range(rng.randint(0, 3)):
            for _attempt in range(10):
                c_try = c + rng.choice((0.5, 1, 1, 2, 3))
                new: Row = {"id": "1", "amount": str(n), "note": f"{office}{n}",
                            "v": _version_text(rng, mode)}
                if held_row is None:
                    op = Op.INSERT
                elif rng.random() < 0.35:
                    op = Op.DELETE
                else:
                    op = Op.UPDATE
                key = _oracle_key(op, None if op is Op.DELETE else new, held_row, c_try, office,
                                  mode, full)
                if held_key is None or key > held_key:
                    break
            else:
                break  # no write newer than what this office holds: its chain ends
            c = c_try
            if op is Op.INSERT:
                change = Incoming(Op.INSERT, new, None, False, at(c), office, {"id": "1"},
                                  identity_full=full)
            elif op is Op.UPDATE:
                assert held_row is not None
                change = Incoming(Op.UPDATE, new, dict(held_row) if full else None, full, at(c),
                                  office, {"id": "1"}, identity_full=full)
            else:
                assert held_row is not None
                change = Incoming(Op.DELETE, None, dict(held_row) if full else {"id": "1"}, full,
                                  at(c), office, {"id": "1"}, identity_full=full)
            result = None if op is Op.DELETE else new
            writes.append(_Write(change, key, result))
            held_row, held_key = result, key
        streams[office] = writes

    finals: dict[str, Row | str | None] = {}
    for office in OFFICES:
        site = start_state(office)
        for w in streams[office]:  # its own writes, locally, in order
            ch = w.change
            if ch.op is Op.DELETE:
                assert site.row is not None
                deleted_v = site.row.values["v"] if column else None
                site.row, site.tomb = None, Tombstone(ch.commit_ts, deleted_v, "")
            else:
                assert ch.new is not None
                site.row, site.tomb = LocalRow(dict(ch.new), ch.commit_ts, ""), None
        r = PolicyResolver("public.grants", "lww", version_column=column, site=office)
        queues = {o: list(streams[o]) for o in OFFICES if o != office}
        while any(queues.values()):
            src = rng.choice([o for o, q in queues.items() if q])
            _receive(site, r, queues[src].pop(0).change)
        finals[office] = dict(site.row.values) if site.row else "gone" if site.tomb else None

    everything = [w for ws in streams.values() for w in ws]
    context = f"seed {seed} (CDC_SYNC_SEED={seed}) {mode} full={full}: {finals}; writes: " + \
        "; ".join(f"{w.change.origin} {w.change.op.value} key={w.key}" for w in everything)
    assert len({repr(v) for v in finals.values()}) == 1, context
    if everything:
        winner = max(everything, key=lambda w: w.key)
        want: Row | str | None = winner.result if winner.result is not None else "gone"
    else:
        want = dict(start_row) if start_kind == "row" else \
            "gone" if start_kind == "tombstone" else None
    assert finals["berlin"] == want, context


@pytest.mark.parametrize(("mode", "full"), [
    ("version", False), ("version", True), ("commit_time", False), ("commit_time", True),
    ("integer", True),  # integer versions need REPLICA IDENTITY FULL (README)
], ids=["timestamp-version-key-only", "timestamp-version-full", "commit-time-key-only",
        "commit-time-full", "integer-version-full"])
def test_concurrent_writes_from_one_state_converge_to_the_highest_key(mode: str,
                                                                     full: bool) -> None:
    seed_env = os.environ.get("CDC_SYNC_SEED", "random")
    first = random.randrange(1 << 30) if seed_env == "random" else int(seed_env)
    for seed in range(first, first + 600):
        _concurrent_run(seed, mode, full)

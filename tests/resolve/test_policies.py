"""The conflict-resolution layer `cdc_sync.resolve`: every strategy against every conflict kind,
version parsing, ties, partial rows, merge functions, counters, and convergence of sites that
see the same concurrent writes in opposite orders."""

from __future__ import annotations

import ast
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import cdc_sync.resolve
from cdc_sync.changes import Op
from cdc_sync.config import ResolvedPolicy
from cdc_sync.errors import ConfigError
from cdc_sync.resolve import (
    CONFLICT_KINDS,
    OUTCOMES,
    Decision,
    Incoming,
    LocalRow,
    PolicyResolver,
    Resolver,
    Tombstone,
    add_delta,
    make_resolver,
    parse_version,
    timestamp_version,
)

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SITE = "carol"
Row = dict[str, str | None]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def policy(strategy: str = "lww", *, version_column: str | None = None,
           counters: tuple[str, ...] = (), merge: str | None = None) -> ResolvedPolicy:
    return ResolvedPolicy(table="public.grants", strategy=strategy,  # type: ignore[arg-type]
                          version_column=version_column, counters=counters, merge=merge,
                          merge_key="conflicts.merge" if merge else None,
                          tombstone_max_age_seconds=3600.0)


def resolver(strategy: str = "lww", *, site: str = SITE, **kwargs: Any) -> Resolver:
    return make_resolver(policy(strategy, **kwargs), site=site)


def base(**values: str | None) -> Row:
    row: Row = {"id": "1", "name": "alpha", "amount": "10.00", "v": "1"}
    row.update(values)
    return row


def local(values: Row | None = None, *, ts: float = 0, origin: str = "bob") -> LocalRow:
    return LocalRow(base() if values is None else values, at(ts), origin)


def insert(new: Row | None = None, *, ts: float = 10, origin: str = "alice") -> Incoming:
    new = base() if new is None else new
    return Incoming(Op.INSERT, new, None, False, at(ts), origin, {"id": new["id"]})


def update(new: Row, old: Row | None = None, *, ts: float = 10, origin: str = "alice",
           full: bool = True, unchanged: frozenset[str] = frozenset()) -> Incoming:
    if old is None:
        old = base()
    if not full:
        old = {"id": old["id"]}
    return Incoming(Op.UPDATE, new, old, full, at(ts), origin, {"id": new["id"]}, unchanged)


def delete(old: Row | None = None, *, ts: float = 10, origin: str = "alice",
           full: bool = True) -> Incoming:
    old = base() if old is None else old
    if not full:
        old = {"id": old["id"]}
    return Incoming(Op.DELETE, None, old, full, at(ts), origin, {"id": old["id"]})


def tomb(*, ts: float = 5, version: str | None = None, origin: str = "bob") -> Tombstone:
    return Tombstone(at(ts), version, origin)


def check(d: Decision, action: str, conflict: str | None, outcome: str) -> None:
    assert (d.action, d.conflict, d.outcome) == (action, conflict, outcome), d
    assert d.conflict is None or d.conflict in CONFLICT_KINDS
    assert d.outcome in OUTCOMES
    assert (d.row is not None) == (action == "write")
    assert (d.tombstone is not None) == (action == "delete")


# -- the model ---------------------------------------------------------------------------------

def test_model_classes_are_slotted() -> None:
    row = local()
    assert not hasattr(row, "__dict__")
    with pytest.raises(AttributeError):
        row.unknown = "x"  # type: ignore[attr-defined]
    d = Decision("skip", None, None, "applied")
    assert d.tombstone is None and not hasattr(d, "__dict__")
    for cls in (Incoming, Tombstone):
        assert "__slots__" in vars(cls)


def test_decision_state_after() -> None:
    prev, change = local(), update(base(name="beta"))
    written = Decision("write", base(name="beta"), None, "applied")
    after = written.local_after(prev, change)
    assert after == LocalRow(base(name="beta"), change.commit_ts, "alice")
    gone = Decision("delete", None, None, "applied", tomb())
    assert gone.local_after(prev, change) is None and gone.tombstone_after(None) == tomb()
    skipped = Decision("skip", None, "update_update", "local_wins")
    assert skipped.local_after(prev, change) is prev and skipped.tombstone_after(tomb()) == tomb()


def test_other_ops_and_missing_new_are_rejected() -> None:
    r = resolver()
    with pytest.raises(ValueError, match="truncate"):
        r.resolve(None, Incoming(Op.TRUNCATE, None, None, False, T0, "a", {}), None)
    with pytest.raises(ValueError, match="without a new row"):
        r.resolve(None, Incoming(Op.UPDATE, None, None, False, T0, "a", {"id": "1"}), None)


def test_resolve_layer_imports_only_stdlib_changes_and_config() -> None:
    allowed = {"cdc_sync.changes", "cdc_sync.config"}
    bad = []
    for path in sorted(Path(cdc_sync.resolve.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if name not in allowed and (top not in sys.stdlib_module_names
                                            or top in {"os", "io", "socket", "time", "logging"}):
                    bad.append(f"{path.name}: {name}")
    assert not bad


# -- versions ----------------------------------------------------------------------------------

def test_version_parsing_kinds() -> None:
    assert parse_version("42").value == Decimal(42)
    assert parse_version("007") == parse_version("7")
    assert parse_version("1.50") == parse_version("1.5")
    assert parse_version("9") < parse_version("10")  # numerically, not as text
    assert parse_version("-3") < parse_version("2.5") < parse_version("1e3")
    assert parse_version("abc").value == "abc"
    assert parse_version("b") > parse_version("a")


@pytest.mark.parametrize(("a", "b"), [
    ("2026-11-28 12:00:00.123+00", "2026-11-28 17:30:00.123+05:30"),
    ("2026-11-28 12:00:00+00", "2026-11-28 09:00:00-03"),
    ("2026-11-28 12:00:00+00", "2026-11-28T12:00:00Z"),
    ("2026-11-28 12:53:28+00:53:28", "2026-11-28 12:00:00+00"),
    ("2026-11-28 12:00:00.5+00", "2026-11-28 12:00:00.500000+00"),
    ("2026-11-28 12:00:00", "2026-11-28 12:00:00+00"),  # without zone: read as UTC
    ("2026-11-28", "2026-11-28 00:00:00"),
])
def test_timestamps_with_offsets_are_the_same_instant(a: str, b: str) -> None:
    assert parse_version(a) == parse_version(b)
    assert parse_version(a).rank == parse_version("2026-01-01").rank


def test_timestamp_order_and_infinities() -> None:
    early, late = parse_version("2026-11-28 12:00:00.123+00"), parse_version(
        "2026-11-28 12:00:00.124+00")
    assert early < late
    assert parse_version("2026-11-28 13:00:00+05:30") < parse_version("2026-11-28 08:00:00+00")
    assert parse_version("-infinity") < early < parse_version("infinity")
    assert parse_version("-Infinity") < parse_version("-1e100")
    assert parse_version("Infinity") > parse_version("1e100")
    assert parse_version("NaN") > parse_version("Infinity")  # PostgreSQL's numeric order
    assert timestamp_version(T0) == parse_version("2026-11-28 12:00:00+00")
    assert timestamp_version(T0.replace(tzinfo=None)) == timestamp_version(T0)
    assert timestamp_version(T0.astimezone(timezone(timedelta(hours=2)))) == timestamp_version(T0)


def test_null_and_incomparable_versions_sort_lowest() -> None:
    null = parse_version(None)
    assert null.is_null and null == timestamp_version(None)
    for other in ("0", "-1e100", "-infinity", "x", "2026-11-28", "infinity"):
        assert null < parse_version(other)
    # Mixed kinds still have one fixed order (strings < numbers < timestamps), never an error.
    assert parse_version("garbage") < parse_version("1") < parse_version("2026-11-28")
    assert parse_version("2026-02-30").rank == parse_version("x").rank  # not a real date


# -- ties and keys -----------------------------------------------------------------------------

def test_tie_on_commit_time_breaks_by_origin_name() -> None:
    r = resolver("lww")
    same_time = update(base(name="beta"), ts=0, origin="zed")
    check(r.resolve(local(ts=0, origin="bob"), same_time, None),
          "write", "update_update", "incoming_wins")
    same_time = update(base(name="beta"), ts=0, origin="alice")
    check(r.resolve(local(ts=0, origin="bob"), same_time, None),
          "skip", "update_update", "local_wins")


def test_same_origin_same_time_is_a_later_change_of_that_transaction() -> None:
    r = resolver("lww")
    first = insert(ts=10, origin="alice")
    d = r.resolve(None, first, None)
    check(d, "write", None, "applied")
    row = d.local_after(None, first)
    second = update(base(name="beta"), ts=10, origin="alice")
    check(r.resolve(row, second, None), "write", None, "applied")


def test_local_row_without_origin_is_the_sites_own_write() -> None:
    r = resolver("lww", site="mallory")
    check(r.resolve(local(ts=0, origin=""), update(base(name="x"), ts=0, origin="zed"), None),
          "write", "update_update", "incoming_wins")
    r = resolver("lww", site="zz")
    check(r.resolve(local(ts=0, origin=""), update(base(name="x"), ts=0, origin="zed"), None),
          "skip", "update_update", "local_wins")


def test_unknown_local_commit_time_is_oldest() -> None:
    r = resolver("lww")
    row = LocalRow(base(), None, "bob")
    check(r.resolve(row, update(base(name="b"), full=False), None), "write", None, "applied")


def test_version_column_orders_instead_of_commit_time() -> None:
    r = resolver("lww", version_column="v")
    # The incoming change is committed earlier but carries a higher version: it wins.
    check(r.resolve(local(base(v="9"), ts=100), update(base(v="10"), base(v="9"), ts=1), None),
          "write", None, "applied")
    check(r.resolve(local(base(v="10"), ts=0), update(base(v="9"), base(v="8"), ts=100), None),
          "skip", "update_update", "local_wins")
    # Equal versions from different origins: the larger origin name wins.
    check(r.resolve(local(base(v="5"), origin="bob"), update(base(v="5", name="n"), full=False,
                                                             origin="zed"), None),
          "write", "update_update", "incoming_wins")
    # NULL version: lowest.
    check(r.resolve(local(base(v=None)), update(base(v="1"), full=False), None),
          "write", None, "applied")
    check(r.resolve(local(base(v="1")), update(base(v=None), full=False), None),
          "skip", "update_update", "local_wins")


def test_timestamp_version_column_with_offsets() -> None:
    r = resolver("lww", version_column="v")
    loc = local(base(v="2026-11-28 12:00:00.123+00"))
    newer = update(base(v="2026-11-28 17:30:00.124+05:30"), full=False)
    older = update(base(v="2026-11-28 17:30:00.122+05:30"), full=False)
    check(r.resolve(loc, newer, None), "write", None, "applied")
    check(r.resolve(loc, older, None), "skip", "update_update", "local_wins")


# -- partial rows (unchanged TOAST) ------------------------------------------------------------

def test_partial_new_is_merged_from_local() -> None:
    r = resolver("lww")
    partial: Row = {"id": "1", "amount": "12.00", "v": "2"}  # "name" not sent
    change = update(partial, full=False, unchanged=frozenset({"name"}))
    d = r.resolve(local(base(name="big text")), change, None)
    check(d, "write", None, "applied")
    assert d.row == base(name="big text", amount="12.00", v="2")


def test_partial_new_takes_unsent_columns_from_full_old() -> None:
    r = resolver("source_wins")
    partial: Row = {"id": "1", "amount": "12.00", "v": "2"}
    change = update(partial, base(name="source text"), unchanged=frozenset({"name"}))
    d = r.resolve(local(base(name="local text", extra="site-only")), change, None)
    assert d.row == base(name="source text", amount="12.00", v="2", extra="site-only")
    # No local row: the full old row completes it.
    d = r.resolve(None, change, None)
    check(d, "write", "update_missing", "incoming_wins")
    assert d.row == base(name="source text", amount="12.00", v="2")


@pytest.mark.parametrize("strategy", ["source_wins", "lww", "first_write_wins"])
def test_update_missing(strategy: str) -> None:
    r = resolver(strategy)
    complete = update(base(name="n"), full=False)
    d = r.resolve(None, complete, None)
    check(d, "write", "update_missing", "incoming_wins")
    assert d.row == base(name="n")
    partial = update({"id": "1", "amount": "3"}, full=False, unchanged=frozenset({"name"}))
    check(r.resolve(None, partial, None), "skip", "update_missing", "local_wins")


# -- source_wins -------------------------------------------------------------------------------

def test_source_wins_fast_path_flag() -> None:
    assert resolver("source_wins").needs_local_rows is False
    assert resolver("source_wins", counters=("amount",)).needs_local_rows is True
    for strategy in ("lww", "first_write_wins"):
        assert resolver(strategy).needs_local_rows is True


def test_resolver_describes_its_policy() -> None:
    r = resolver("lww", version_column="v", counters=("amount",))
    assert isinstance(r, PolicyResolver)
    assert r.strategy == "lww" and r.version_column == "v"
    assert r.counters == frozenset({"amount"})
    assert "lww" in repr(r)
    with pytest.raises(ValueError, match="unknown conflict strategy"):
        resolver("newest")


def test_source_wins_without_local_state_applies_everything() -> None:
    r = resolver("source_wins")
    check(r.resolve(None, insert(), None), "write", None, "applied")
    check(r.resolve(None, delete(), None), "delete", "delete_missing", "deleted")


def test_source_wins_conflicts() -> None:
    r = resolver("source_wins")
    newer_local = local(base(name="mine"), ts=100)
    check(r.resolve(newer_local, insert(base(name="theirs")), None),
          "write", "insert_insert", "incoming_wins")
    d = r.resolve(newer_local, update(base(name="theirs")), None)
    check(d, "write", "update_update", "incoming_wins")
    assert d.row == base(name="theirs")
    check(r.resolve(local(ts=0), update(base(name="theirs")), None), "write", None, "applied")
    check(r.resolve(None, update(base(name="t")), tomb(ts=100)),
          "write", "update_delete", "incoming_wins")
    partial = update({"id": "1", "name": "t"}, full=False, unchanged=frozenset({"amount"}))
    check(r.resolve(None, partial, tomb()), "skip", "update_delete", "kept_deleted")
    check(r.resolve(None, insert(ts=10), tomb(ts=100)),
          "write", "insert_deleted", "incoming_wins")
    check(r.resolve(None, insert(ts=10), tomb(ts=1)), "write", None, "applied")
    check(r.resolve(newer_local, delete(), None), "delete", "delete_update", "deleted")
    check(r.resolve(local(ts=0), delete(), None), "delete", None, "applied")
    check(r.resolve(None, delete(ts=10), tomb(ts=100)), "skip", "delete_missing", "kept_deleted")


# -- lww ---------------------------------------------------------------------------------------

def test_lww_updates() -> None:
    r = resolver("lww")
    check(r.resolve(local(ts=0), update(base(name="b"), ts=10), None), "write", None, "applied")
    check(r.resolve(local(ts=0), update(base(name="b"), ts=10, full=False), None),
          "write", None, "applied")
    check(r.resolve(local(ts=100), update(base(name="b"), ts=10), None),
          "skip", "update_update", "local_wins")
    # The local row changed concurrently (old differs) but the incoming change is newer.
    d = r.resolve(local(base(name="mine"), ts=5), update(base(name="b"), ts=10), None)
    check(d, "write", "update_update", "incoming_wins")
    assert d.row == base(name="b")


def test_lww_insert_insert() -> None:
    r = resolver("lww")
    check(r.resolve(local(ts=0), insert(ts=10), None), "write", "insert_insert", "incoming_wins")
    check(r.resolve(local(ts=100), insert(ts=10), None), "skip", "insert_insert", "local_wins")


def test_lww_update_delete() -> None:
    r = resolver("lww")
    d = r.resolve(None, update(base(name="b"), ts=10), tomb(ts=5))
    check(d, "write", "update_delete", "incoming_wins")
    assert d.row == base(name="b")
    check(r.resolve(None, update(base(name="b"), ts=10), tomb(ts=50)),
          "skip", "update_delete", "kept_deleted")
    partial = update({"id": "1", "name": "b"}, full=False, unchanged=frozenset({"amount"}))
    check(r.resolve(None, partial, tomb(ts=5)), "skip", "update_delete", "kept_deleted")


def test_lww_insert_vs_tombstone() -> None:
    r = resolver("lww")
    check(r.resolve(None, insert(ts=10), tomb(ts=50)), "skip", "insert_deleted", "kept_deleted")
    check(r.resolve(None, insert(ts=60), tomb(ts=50)), "write", None, "applied")
    # Delete then re-insert in one source transaction: same key, the insert comes later.
    check(r.resolve(None, insert(ts=50, origin="bob"), tomb(ts=50, origin="bob")),
          "write", None, "applied")


def test_lww_delete_update() -> None:
    r = resolver("lww")
    check(r.resolve(local(ts=100), delete(ts=10), None), "skip", "delete_update", "local_wins")
    check(r.resolve(local(ts=100), delete(ts=10, full=False), None),
          "skip", "delete_update", "local_wins")
    d = r.resolve(local(base(name="mine"), ts=5), delete(ts=10), None)
    check(d, "delete", "delete_update", "deleted")
    check(r.resolve(local(ts=0), delete(ts=10), None), "delete", None, "applied")


def test_lww_delete_missing_records_tombstone() -> None:
    r = resolver("lww")
    d = r.resolve(None, delete(ts=10, origin="alice"), None)
    check(d, "delete", "delete_missing", "deleted")
    assert d.tombstone == Tombstone(at(10), None, "alice")
    check(r.resolve(None, delete(ts=10), tomb(ts=5)), "delete", "delete_missing", "deleted")
    check(r.resolve(None, delete(ts=10), tomb(ts=50)), "skip", "delete_missing", "kept_deleted")


def test_lww_version_column_deletes_and_tombstones() -> None:
    r = resolver("lww", version_column="v")
    # The delete removed version 3; the local row is at 5: it was updated since.
    check(r.resolve(local(base(v="5")), delete(base(v="3")), None),
          "skip", "delete_update", "local_wins")
    d = r.resolve(local(base(v="3")), delete(base(v="3")), None)
    check(d, "delete", None, "applied")
    assert d.tombstone == Tombstone(at(10), "3", "alice")
    # Key-only old without the version: the delete removes what is there.
    d = r.resolve(local(base(v="5")), delete(base(v="3"), full=False), None)
    check(d, "delete", None, "applied")
    assert d.tombstone is not None and d.tombstone.version == "5"
    # Updates and inserts against the tombstone's version.
    check(r.resolve(None, update(base(v="6"), base(v="5")), tomb(version="5")),
          "write", "update_delete", "incoming_wins")
    check(r.resolve(None, update(base(v="5"), base(v="4")), tomb(version="5")),
          "skip", "update_delete", "kept_deleted")
    check(r.resolve(None, insert(base(v="2")), tomb(version="5")),
          "skip", "insert_deleted", "kept_deleted")
    check(r.resolve(None, insert(base(v="6")), tomb(version="5")), "write", None, "applied")
    check(r.resolve(None, insert(base(v="5"), origin="bob"), tomb(version="5", origin="bob")),
          "write", None, "applied")
    check(r.resolve(None, delete(base(v="4")), tomb(version="5")),
          "skip", "delete_missing", "kept_deleted")
    check(r.resolve(None, delete(base(v="6")), tomb(version="5")),
          "delete", "delete_missing", "deleted")


# -- first_write_wins --------------------------------------------------------------------------

def test_fww_sequential_changes_apply() -> None:
    r = resolver("first_write_wins")
    check(r.resolve(local(ts=0), update(base(name="b"), ts=10), None), "write", None, "applied")
    check(r.resolve(None, insert(), None), "write", None, "applied")
    check(r.resolve(local(ts=0), delete(ts=10), None), "delete", None, "applied")


def test_fww_update_update_and_insert_insert() -> None:
    r = resolver("first_write_wins")
    mine = local(base(name="mine"), ts=5)
    check(r.resolve(mine, update(base(name="b"), ts=10), None),
          "skip", "update_update", "local_wins")
    d = r.resolve(local(base(name="mine"), ts=50), update(base(name="b"), ts=10), None)
    check(d, "write", "update_update", "incoming_wins")
    assert d.row == base(name="b")
    check(r.resolve(local(ts=5), insert(ts=10), None), "skip", "insert_insert", "local_wins")
    check(r.resolve(local(ts=50), insert(ts=10), None),
          "write", "insert_insert", "incoming_wins")


def test_fww_deletes_win_over_concurrent_updates() -> None:
    r = resolver("first_write_wins")
    check(r.resolve(local(ts=100), delete(ts=10), None), "delete", "delete_update", "deleted")
    check(r.resolve(local(base(name="mine"), ts=5), delete(ts=10), None),
          "delete", "delete_update", "deleted")
    check(r.resolve(None, update(base(name="b"), ts=10), tomb(ts=5)),
          "skip", "update_delete", "kept_deleted")
    check(r.resolve(None, update(base(name="b"), ts=10), tomb(ts=50)),
          "skip", "update_delete", "kept_deleted")
    check(r.resolve(None, insert(ts=10), tomb(ts=50)), "skip", "insert_deleted", "kept_deleted")
    check(r.resolve(None, insert(ts=60), tomb(ts=50)), "write", None, "applied")
    check(r.resolve(None, delete(), None), "delete", "delete_missing", "deleted")


# -- merge -------------------------------------------------------------------------------------

@dataclass
class MergeSpy:
    result: Callable[[Row | None, Row | None, Incoming], Any]
    calls: list[tuple[Row | None, Row | None, Incoming]] = field(default_factory=list)

    def __call__(self, loc: Row | None, inc: Row | None, change: Incoming) -> Any:
        self.calls.append((loc, inc, change))
        return self.result(loc, inc, change)


@pytest.fixture
def merge_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[MergeSpy]:
    """A merge function importable as "cdc_test_merge:fn" (the real load path)."""
    spy = MergeSpy(lambda loc, inc, change: {**(loc or {}), **(inc or {}), "name": "merged"})
    module = types.ModuleType("cdc_test_merge")
    module.fn = spy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cdc_test_merge", module)
    yield spy


def merge_resolver(**kwargs: Any) -> Resolver:
    return resolver("merge", merge="cdc_test_merge:fn", **kwargs)


def test_merge_function_is_loaded_once(merge_spy: MergeSpy) -> None:
    loads = []

    @dataclass(frozen=True)
    class CountingPolicy(ResolvedPolicy):
        def load_merge(self) -> Callable[..., Any]:
            loads.append(1)
            return ResolvedPolicy.load_merge(self)

    p = CountingPolicy("public.grants", "merge", None, (), "cdc_test_merge:fn",
                       "conflicts.merge", 3600.0)
    r = make_resolver(p, site=SITE)
    for _ in range(3):
        r.resolve(local(ts=100), update(base(name="b")), None)
    assert loads == [1] and len(merge_spy.calls) == 3
    assert r.needs_local_rows


def test_merge_function_import_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="conflicts.merge"):
        resolver("merge", merge="cdc_no_such_module_here:fn")


def test_merge_not_called_without_conflict(merge_spy: MergeSpy) -> None:
    r = merge_resolver()
    check(r.resolve(None, insert(), None), "write", None, "applied")
    check(r.resolve(local(ts=0), update(base(name="b")), None), "write", None, "applied")
    check(r.resolve(local(ts=0), delete(), None), "delete", None, "applied")
    check(r.resolve(None, insert(ts=60), tomb(ts=50)), "write", None, "applied")
    assert merge_spy.calls == []


def test_merge_update_update_returns_row(merge_spy: MergeSpy) -> None:
    r = merge_resolver()
    change = update({"id": "1", "amount": "12.00", "v": "2"}, unchanged=frozenset({"name"}))
    d = r.resolve(local(base(name="mine", amount="11.00"), ts=100), change, None)
    check(d, "write", "update_update", "merged")
    assert d.row == base(name="merged", amount="12.00", v="2")
    loc, inc, seen = merge_spy.calls[0]
    assert loc == base(name="mine", amount="11.00")
    assert inc == base(amount="12.00", v="2")  # "name" filled from the full old row
    assert seen is change


def test_merge_returning_none_deletes_or_skips(merge_spy: MergeSpy) -> None:
    merge_spy.result = lambda loc, inc, change: None
    r = merge_resolver(version_column="v")
    d = r.resolve(local(base(v="7")), insert(base(v="1")), None)
    check(d, "delete", "insert_insert", "deleted")
    assert d.tombstone == Tombstone(at(10), "7", "alice")
    check(r.resolve(None, update(base(), full=False), None), "skip", "update_missing", "local_wins")
    check(r.resolve(None, update(base(v="0")), tomb(version="5")),
          "skip", "update_delete", "kept_deleted")
    check(r.resolve(None, insert(base(v="0")), tomb(version="5")),
          "skip", "insert_deleted", "kept_deleted")
    check(r.resolve(local(base(v="9")), delete(base(v="3")), None),
          "delete", "delete_update", "deleted")
    check(r.resolve(None, delete(), None), "delete", "delete_missing", "deleted")
    assert [(c[0] is None, c[1] is None) for c in merge_spy.calls] == [
        (False, False), (True, False), (True, False), (True, False), (False, True), (True, True)]


def test_merge_sees_deletes_and_tombstones(merge_spy: MergeSpy) -> None:
    r = merge_resolver()
    d = r.resolve(local(ts=100), delete(ts=10), None)
    check(d, "write", "delete_update", "merged")
    assert merge_spy.calls[-1][:2] == (base(), None)
    d = r.resolve(None, insert(ts=10), tomb(ts=50))
    check(d, "write", "insert_deleted", "merged")
    assert merge_spy.calls[-1][:2] == (None, base())


def test_merge_function_exceptions_propagate(merge_spy: MergeSpy) -> None:
    def boom(loc: Row | None, inc: Row | None, change: Incoming) -> Any:
        raise RuntimeError("user bug")

    merge_spy.result = boom
    with pytest.raises(RuntimeError, match="user bug"):
        merge_resolver().resolve(local(ts=100), update(base(name="b")), None)


def test_merge_result_values_become_text(merge_spy: MergeSpy) -> None:
    merge_spy.result = lambda loc, inc, change: {
        "id": 1, "ok": True, "amount": Decimal("1.50"), "at": T0, "name": None, "f": 0.5}
    d = merge_resolver().resolve(local(ts=100), insert(), None)
    assert d.row == {"id": "1", "ok": "true", "amount": "1.50",
                     "at": "2026-11-28T12:00:00+00:00", "name": None, "f": "0.5"}
    merge_spy.result = lambda loc, inc, change: {"id": object()}
    with pytest.raises(TypeError, match="column 'id'"):
        merge_resolver().resolve(local(ts=100), insert(), None)
    merge_spy.result = lambda loc, inc, change: ["not", "a", "dict"]
    with pytest.raises(TypeError, match="expected a dict or None"):
        merge_resolver().resolve(local(ts=100), insert(), None)


def test_merge_function_gets_fresh_dicts(merge_spy: MergeSpy) -> None:
    def mutate(loc: Row | None, inc: Row | None, change: Incoming) -> Any:
        assert loc is not None and inc is not None
        loc["name"] = "scribbled"
        inc["name"] = "scribbled"
        return None

    merge_spy.result = mutate
    values = base()
    new = base(name="b")
    merge_resolver().resolve(LocalRow(values, at(100), "bob"), update(new), None)
    assert values == base() and new == base(name="b")


# -- counters ----------------------------------------------------------------------------------

def test_add_delta_text_forms() -> None:
    assert add_delta("10.50", "3.25", "1.00") == "12.75"
    assert add_delta("10", "7", "3") == "14"
    assert add_delta("10.5", "2.25", "0.25") == "12.5"
    assert add_delta("10.5", "2.255", "0.25") == "12.505"
    assert add_delta("-1.00", "1.00", "0.00") == "0.00"
    assert add_delta("1e20", "5", "0") == "100000000000000000005"
    big = "1" + "0" * 60
    assert add_delta(big, "1", "0") == "1" + "0" * 59 + "1"  # exact beyond 28 digits
    for bad in ((None, "1", "0"), ("1", None, "0"), ("NaN", "1", "0"), ("1", "Infinity", "0"),
                ("$1.00", "1", "0")):
        assert add_delta(*bad) is None


@pytest.mark.parametrize("strategy", ["source_wins", "lww", "first_write_wins"])
def test_counters_apply_deltas_whoever_wins(strategy: str) -> None:
    r = resolver(strategy, counters=("amount",))
    # The site has 10.50 (someone added 0.50 here); the source moved 1.00 -> 3.25.
    mine = local(base(amount="10.50", name="mine"), ts=100)
    change = update(base(amount="3.25", name="theirs"), base(amount="1.00"), ts=10)
    d = r.resolve(mine, change, None)
    assert d.row is not None and d.row["amount"] == "12.75"
    if strategy == "source_wins":
        check(d, "write", "update_update", "incoming_wins")
        assert d.row["name"] == "theirs"
    else:  # the local row is newer: lww keeps it, fww lets the older incoming change win
        assert d.row["name"] == ("mine" if strategy == "lww" else "theirs")
        assert d.outcome == ("local_wins" if strategy == "lww" else "incoming_wins")


def test_counters_only_difference_is_not_a_conflict() -> None:
    r = resolver("lww", counters=("amount",))
    d = r.resolve(local(base(amount="11.00"), ts=5),
                  update(base(amount="13.00", name="b"), base(amount="10.00"), ts=10), None)
    check(d, "write", None, "applied")
    assert d.row == base(amount="14.00", name="b")


def test_counters_local_wins_without_delta_is_a_skip() -> None:
    r = resolver("lww", counters=("amount",))
    change = update(base(name="b"), base(), ts=10)  # amount unchanged
    check(r.resolve(local(base(name="mine"), ts=100), change, None),
          "skip", "update_update", "local_wins")


def test_counters_fall_back_to_the_strategy() -> None:
    r = resolver("lww", counters=("amount", "missing"))
    # No full old row: plain lww.
    d = r.resolve(local(base(amount="11.00"), ts=0),
                  update(base(amount="13.00"), full=False, ts=10), None)
    assert d.row is not None and d.row["amount"] == "13.00"
    # NULL or non-numeric counter values: the column follows the strategy.
    d = r.resolve(local(base(amount=None), ts=0),
                  update(base(amount="13.00"), base(amount="10.00"), ts=10), None)
    assert d.row is not None and d.row["amount"] == "13.00"
    # No local row: the strategy (update_missing) decides.
    d = r.resolve(None, update(base(amount="13.00"), base(amount="10.00")), None)
    check(d, "write", "update_missing", "incoming_wins")
    assert d.row is not None and d.row["amount"] == "13.00"
    # Inserts have no delta.
    d = r.resolve(local(base(amount="5"), ts=0), insert(base(amount="7"), ts=10), None)
    assert d.row is not None and d.row["amount"] == "7"


# -- convergence: every site ends with the same row ---------------------------------------------

@dataclass
class Site:
    """A site database in miniature: rows and tombstones by id, written through the resolver
    for replicated changes and directly (with a tombstone on delete) for its own writes."""

    name: str
    resolver: Resolver
    version_column: str | None
    rows: dict[str, LocalRow] = field(default_factory=dict)
    tombs: dict[str, Tombstone] = field(default_factory=dict)

    def apply(self, change: Incoming) -> Decision:
        key = change.key["id"]
        assert key is not None
        row, tombstone = self.rows.get(key), self.tombs.get(key)
        decision = self.resolver.resolve(row, change, tombstone)
        after = decision.local_after(row, change)
        if after is None:
            self.rows.pop(key, None)
        else:
            self.rows[key] = after
        tombstone = decision.tombstone_after(tombstone)
        if tombstone is not None:
            self.tombs[key] = tombstone
        return decision

    def write(self, key: str, changes: Row, ts: float, *, full: bool = True) -> Incoming:
        before = self.rows.get(key)
        ts_ = at(ts)
        if before is None:
            new = {"id": key, **changes}
            self.rows[key] = LocalRow(new, ts_, self.name)
            return Incoming(Op.INSERT, new, None, False, ts_, self.name, {"id": key})
        new = {**before.values, **changes}
        self.rows[key] = LocalRow(new, ts_, self.name)
        old = dict(before.values) if full else {"id": key}
        return Incoming(Op.UPDATE, new, old, full, ts_, self.name, {"id": key})

    def delete(self, key: str, ts: float, *, full: bool = True) -> Incoming:
        before = self.rows.pop(key)
        version = before.values.get(self.version_column) if self.version_column else None
        self.tombs[key] = Tombstone(at(ts), version, self.name)
        old = dict(before.values) if full else {"id": key}
        return Incoming(Op.DELETE, None, old, full, at(ts), self.name, {"id": key})

    def state(self, key: str) -> Mapping[str, str | None] | None:
        row = self.rows.get(key)
        return None if row is None else dict(row.values)


def offices(strategy: str, version_column: str | None, counters: tuple[str, ...] = ()
            ) -> dict[str, Site]:
    p = policy(strategy, version_column=version_column, counters=counters)
    return {name: Site(name, make_resolver(p, site=name), version_column)
            for name in ("austin", "boston", "chicago", "denver")}


def replicate_base(sites: dict[str, Site], values: Row) -> None:
    origin = sites["austin"]
    change = origin.write("1", values, 0)
    for site in sites.values():
        if site is not origin:
            check(site.apply(change), "write", None, "applied")


def exchange(sites: dict[str, Site], w_austin: Incoming | None, w_boston: Incoming) -> None:
    """austin and boston wrote concurrently; each gets the other's write; chicago gets austin's
    first, denver boston's first."""
    a, b, c, d = (sites[n] for n in ("austin", "boston", "chicago", "denver"))
    assert w_austin is not None
    b.apply(w_austin)
    a.apply(w_boston)
    c.apply(w_austin)
    c.apply(w_boston)
    d.apply(w_boston)
    d.apply(w_austin)


def assert_converged(sites: dict[str, Site]) -> Mapping[str, str | None] | None:
    states = {name: site.state("1") for name, site in sites.items()}
    first = states["austin"]
    assert all(state == first for state in states.values()), states
    return first


MODES = [pytest.param(None, id="commit_ts"), pytest.param("v", id="version_column")]


@pytest.mark.parametrize("strategy", ["lww", "first_write_wins"])
@pytest.mark.parametrize("version_column", MODES)
@pytest.mark.parametrize("austin_first", [True, False])
@pytest.mark.parametrize("full", [True, False])
def test_concurrent_updates_converge(strategy: str, version_column: str | None,
                                     austin_first: bool, full: bool) -> None:
    if strategy == "first_write_wins" and not full:
        pytest.skip("fww needs REPLICA IDENTITY FULL to see that a newer update is concurrent")
    sites = offices(strategy, version_column)
    replicate_base(sites, {"name": "base", "amount": "10", "v": "1"})
    ta, tb = (10, 20) if austin_first else (20, 10)
    # With a version column both writers bump 1 -> 2 (a tie broken by origin name) or
    # write distinct versions following their time order.
    va, vb = ("2", "2") if austin_first else ("3", "2")
    w_a = sites["austin"].write("1", {"name": "from austin", "v": va}, ta, full=full)
    w_b = sites["boston"].write("1", {"name": "from boston", "v": vb}, tb, full=full)
    exchange(sites, w_a, w_b)
    final = assert_converged(sites)
    assert final is not None
    if version_column is None:
        lww_winner = "boston" if austin_first else "austin"
    else:
        lww_winner = "boston" if austin_first else "austin"  # tie -> larger name; else higher v
    winner = lww_winner if strategy == "lww" else ({"austin", "boston"} - {lww_winner}).pop()
    assert final["name"] == f"from {winner}"


@pytest.mark.parametrize("strategy", ["lww", "first_write_wins"])
@pytest.mark.parametrize("version_column", MODES)
@pytest.mark.parametrize("update_first", [True, False])
def test_concurrent_update_and_delete_converge(strategy: str, version_column: str | None,
                                               update_first: bool) -> None:
    sites = offices(strategy, version_column)
    replicate_base(sites, {"name": "base", "amount": "10", "v": "1"})
    tu, td = (10, 20) if update_first else (20, 10)
    w_a = sites["austin"].write("1", {"name": "from austin", "v": "2"}, tu)
    w_b = sites["boston"].delete("1", td)
    exchange(sites, w_a, w_b)
    final = assert_converged(sites)
    if strategy == "first_write_wins":
        assert final is None  # deletes win over concurrent updates
    elif version_column is None:
        assert (final is None) == update_first  # the later one wins
    else:
        assert final is not None and final["name"] == "from austin"  # v2 > deleted v1


@pytest.mark.parametrize("strategy", ["lww", "first_write_wins"])
@pytest.mark.parametrize("version_column", MODES)
def test_concurrent_inserts_converge(strategy: str, version_column: str | None) -> None:
    sites = offices(strategy, version_column)
    w_a = sites["austin"].write("1", {"name": "from austin", "v": "1"}, 20)
    w_b = sites["boston"].write("1", {"name": "from boston", "v": "1"}, 10)
    for name in ("chicago", "denver"):
        assert sites[name].state("1") is None
    exchange(sites, w_a, w_b)
    final = assert_converged(sites)
    assert final is not None
    if version_column is None:
        expected = "austin" if strategy == "lww" else "boston"
    else:  # equal versions: the larger origin name ranks higher
        expected = "boston" if strategy == "lww" else "austin"
    assert final["name"] == f"from {expected}"


@pytest.mark.parametrize("strategy", ["lww", "first_write_wins"])
@pytest.mark.parametrize("version_column", MODES)
@pytest.mark.parametrize("austin_first", [True, False])
def test_concurrent_increments_from_two_offices_add_up(strategy: str, version_column: str | None,
                                                       austin_first: bool) -> None:
    sites = offices(strategy, version_column, counters=("amount",))
    replicate_base(sites, {"name": "base", "amount": "10.00", "v": "1"})
    ta, tb = (10, 20) if austin_first else (20, 10)
    w_a = sites["austin"].write("1", {"amount": "13.25", "v": "2"}, ta)  # +3.25
    w_b = sites["boston"].write("1", {"amount": "11.00", "name": "renamed", "v": "2"}, tb)  # +1
    exchange(sites, w_a, w_b)
    final = assert_converged(sites)
    assert final is not None
    assert final["amount"] == "14.25"
    assert final["name"] in ("renamed", "base")


def test_counters_converge_over_three_offices() -> None:
    sites = offices("lww", None, counters=("amount",))
    sites["erie"] = Site("erie", make_resolver(policy("lww", counters=("amount",)), site="erie"),
                         None)
    replicate_base(sites, {"name": "base", "amount": "0"})
    writes = {name: sites[name].write("1", {"amount": str(n)}, 10 + n)
              for n, name in enumerate(("austin", "boston", "erie"), start=1)}
    orders = {"austin": ("boston", "erie"), "boston": ("erie", "austin"),
              "erie": ("austin", "boston"), "chicago": ("austin", "boston", "erie"),
              "denver": ("erie", "boston", "austin")}
    for site, order in orders.items():
        for writer in order:
            sites[site].apply(writes[writer])
    final = assert_converged(sites)
    assert final is not None and final["amount"] == "6"

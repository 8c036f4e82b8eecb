"""Run planning: consecutive changes grouped only where one statement equals applying them in order."""

from __future__ import annotations

from cdc_sync.changes import UNCHANGED_TOAST, Change, Op, Table
from cdc_sync.protocol import ReplicaIdentity
from cdc_sync.sinks._plan import by_table, plan_runs, sent_columns

T = Table(1, "public", "t", ("id", "v", "big"), (23, 25, 25), (-1, -1, -1), (0,), ReplicaIdentity.DEFAULT)
U = Table(2, "public", "u", ("id", "v"), (23, 25), (-1, -1), (0,), ReplicaIdentity.DEFAULT)
KEYS = {1: (0,), 2: (0,)}


def ins(table: Table, pos: int, *values: object) -> Change:
    return Change(Op.INSERT, pos, table, new=tuple(values))  # type: ignore[arg-type]


def upd(table: Table, pos: int, new: tuple[object, ...], old: tuple[object, ...] | None = None) -> Change:
    return Change(Op.UPDATE, pos, table, new=new, old=old, old_is_key=old is not None)  # type: ignore[arg-type]


def dele(table: Table, pos: int, key: object) -> Change:
    return Change(Op.DELETE, pos, table, old=(key, None, None), old_is_key=True)  # type: ignore[arg-type]


def shape(changes: list[Change]) -> list[tuple[str, str, int]]:
    return [(r.op.value, r.table.name if r.table else "-", len(r.changes))
            for r in plan_runs(changes, KEYS)]


def test_consecutive_same_table_and_op_form_one_run() -> None:
    changes = [ins(T, i, str(i), "v", "b") for i in range(100)]
    assert shape(changes) == [("insert", "t", 100)]


def test_op_or_table_change_splits() -> None:
    changes = [ins(T, 0, "1", "a", "b"), ins(U, 1, "1", "a"), ins(T, 2, "2", "a", "b"),
               upd(T, 3, ("2", "x", "b")), dele(T, 4, "1")]
    assert shape(changes) == [("insert", "t", 1), ("insert", "u", 1), ("insert", "t", 1),
                              ("update", "t", 1), ("delete", "t", 1)]


def test_same_key_twice_splits_the_run() -> None:
    changes = [upd(T, 0, ("1", "a", "b")), upd(T, 1, ("2", "a", "b")), upd(T, 2, ("1", "c", "b"))]
    assert shape(changes) == [("update", "t", 2), ("update", "t", 1)]


def test_key_change_chain_splits_where_keys_meet() -> None:
    # 1 -> 2 then 2 -> 3: the second touches the row the first produced.
    changes = [upd(T, 0, ("2", "a", "b"), old=("1", None, None)),
               upd(T, 1, ("3", "a", "b"), old=("2", None, None))]
    assert shape(changes) == [("update", "t", 1), ("update", "t", 1)]


def test_unchanged_toast_columns_split_updates_by_column_set() -> None:
    a = upd(T, 0, ("1", "x", UNCHANGED_TOAST))
    b = upd(T, 1, ("2", "y", UNCHANGED_TOAST))
    c = upd(T, 2, ("3", "z", "big"))
    runs = list(plan_runs([a, b, c], KEYS))
    assert [len(r.changes) for r in runs] == [2, 1]
    assert runs[0].columns == (0, 1)
    assert runs[1].columns == (0, 1, 2)
    assert sent_columns(a.new or ()) == (0, 1)


def test_keyless_tables_get_one_run_per_change() -> None:
    changes = [ins(T, i, "1", "same", "row") for i in range(3)]
    assert shape_without_keys(changes) == [("insert", "t", 1)] * 3


def shape_without_keys(changes: list[Change]) -> list[tuple[str, str, int]]:
    return [(r.op.value, r.table.name if r.table else "-", len(r.changes))
            for r in plan_runs(changes, {})]


def test_truncate_and_messages_stand_alone_and_keep_order() -> None:
    trunc = Change(Op.TRUNCATE, 2, truncated=(T,))
    msg = Change(Op.MESSAGE, 3, prefix="p", content=b"x")
    changes = [ins(T, 0, "1", "a", "b"), ins(T, 1, "2", "a", "b"), trunc, msg, ins(T, 4, "1", "a", "b")]
    assert shape(changes) == [("insert", "t", 2), ("truncate", "-", 1), ("message", "-", 1),
                              ("insert", "t", 1)]


def test_every_change_appears_once_in_order() -> None:
    changes = [ins(T, 0, "1", "a", "b"), upd(T, 1, ("1", "b", "b")), dele(T, 2, "1"),
               ins(T, 3, "1", "c", "b"), upd(U, 4, ("5", "x")), upd(U, 5, ("6", "y"))]
    flat = [c for r in plan_runs(changes, KEYS) for c in r.changes]
    assert flat == changes


def test_by_table_keeps_each_tables_order_and_truncate_barriers() -> None:
    a1, b1, a2, b2 = ins(T, 0, "1", "a", "b"), ins(U, 1, "1", "a"), ins(T, 2, "2", "a", "b"), \
        ins(U, 3, "2", "a")
    trunc = Change(Op.TRUNCATE, 4, truncated=(T,))
    a3 = ins(T, 5, "3", "a", "b")
    assert by_table([a1, b1, a2, b2, trunc, a3]) == [a1, a2, b1, b2, trunc, a3]


def test_compaction_keeps_only_the_last_whole_row_update_of_a_key() -> None:
    changes = [upd(T, 0, ("1", "a", "b")), upd(T, 1, ("2", "a", "b")),
               upd(T, 2, ("1", "c", "b")), upd(T, 3, ("1", "d", "b"))]
    runs = list(plan_runs(changes, KEYS, compact={T.oid}))
    assert len(runs) == 1
    assert runs[0].changes == (changes[3], changes[1])
    # without compaction the same key ends the run
    assert len(list(plan_runs(changes, KEYS))) == 3


def test_compaction_never_swallows_key_changes_or_partial_rows() -> None:
    move = upd(T, 0, ("2", "a", "b"), old=("1", None, None))
    after = upd(T, 1, ("2", "c", "b"))
    partial = upd(T, 2, ("2", "x", UNCHANGED_TOAST))
    runs = list(plan_runs([move, after, partial], KEYS, compact={T.oid}))
    assert [r.changes for r in runs] == [(move,), (after,), (partial,)]

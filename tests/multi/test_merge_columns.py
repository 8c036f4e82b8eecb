"""Per-column merge on real servers: `[conflicts.tables."public.grants"] merge_columns = true`.

Three offices replicating both ways. While the replicators are paused (so the writes are
concurrent: neither office has seen the other's), Berlin changes a grant's `amount` and Tokyo
its `note`; once they run again every office holds both changes. Then a delete at Washington
loses to a later change of one column at Berlin, and a later delete wins; `init` refuses a
table without REPLICA IDENTITY FULL. The randomised three-office case under faults is
`test_offices_converge_column_by_column_under_faults` in test_convergence.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cdc_sync import commands
from cdc_sync.errors import ConfigError
from tests.integration.helpers import connect

from .helpers import Office, mesh, office_settings

B, T, W = "berlin", "tokyo", "washington"
DDL = (
    "CREATE TABLE grants (id int PRIMARY KEY, office text, amount numeric(12,2), note text, "
    "writer text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "ALTER TABLE grants REPLICA IDENTITY FULL",
)
COLUMNS = {"strategy": "lww", "tables": {"public.grants": {"merge_columns": True}}}


def grant(o: Office, key: int = 1) -> tuple[object, ...] | None:
    with connect(o.dsn) as conn:
        row = conn.execute("SELECT amount::text, note, writer FROM grants WHERE id = %s",
                           (key,)).fetchone()
    return None if row is None else tuple(row)


def test_concurrent_changes_of_different_columns_both_survive(
        offices: Callable[..., list[Office]]) -> None:
    made = offices([B, T, W], DDL)
    with mesh(made, conflicts=COLUMNS) as m:
        m.office(W).execute("INSERT INTO grants (id, office, amount, note, writer) "
                            "VALUES (1, 'washington', 100, 'draft', 'ann')")
        m.wait_same()
        with m.paused():
            m.office(B).execute("UPDATE grants SET amount = 250 WHERE id = 1")
            m.office(T).execute("UPDATE grants SET note = 'approved' WHERE id = 1")
        m.wait_same()
        want = ("250.00", "approved", "ann")
        assert {o.name: grant(o) for o in made} == {o.name: want for o in made}
        kinds = {(c["kind"], c["outcome"]) for c in m.all_conflicts()}
        assert kinds <= {("update_update", "applied"), ("update_update", "incoming_wins"),
                         ("update_update", "merged")}, kinds

        # A delete loses to a later change of any column, and keeps nothing back from it.
        with m.paused():
            m.office(W).execute("DELETE FROM grants WHERE id = 1")
            m.office(B).execute("UPDATE grants SET writer = 'bob' WHERE id = 1")
        m.wait_same()
        assert {o.name: grant(o) for o in made} == {
            o.name: ("250.00", "approved", "bob") for o in made}
        # A later delete removes it everywhere.
        m.office(T).execute("DELETE FROM grants WHERE id = 1")
        m.wait_same()
        assert {o.name: grant(o) for o in made} == {o.name: None for o in made}


def test_init_refuses_merge_columns_without_replica_identity_full(
        offices: Callable[..., list[Office]]) -> None:
    made = offices([B, T], DDL[:1])
    settings = office_settings(made[0], made[1:], conflicts=COLUMNS)
    with pytest.raises(ConfigError, match="REPLICA IDENTITY FULL"):
        commands.init(settings)

"""Unit tests of `commands` helpers of `init` that need no database."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from cdc_sync import commands
from cdc_sync.config import STRATEGIES, settings_from_dict
from cdc_sync.errors import ConfigError
from cdc_sync.resolve import make_resolver
from cdc_sync.source.catalog import ColumnDef, TableDef


def _table() -> TableDef:
    col = ColumnDef(name="id", type_sql="integer", not_null=True, generated=False,
                    type_schema="pg_catalog", type_name="int4", type_kind="b")
    ver = ColumnDef(name="v", type_sql="bigint", not_null=False, generated=False,
                    type_schema="pg_catalog", type_name="int8", type_kind="b")
    return TableDef(schema="public", name="t", columns=(col, ver), primary_key=("id",),
                    replica_identity="f", has_identity_index=True)


@pytest.mark.parametrize(("strategy", "counters", "version_column", "override"),
                         list(itertools.product(STRATEGIES, ((), ("v",)), (None, "v"),
                                                (False, True))))
def test_tombstone_policy_agrees_with_the_resolver(strategy: str, counters: tuple[str, ...],
                                                   version_column: str | None,
                                                   override: bool) -> None:
    """`_tombstone_policy` answers from the settings, without importing the resolvers: the
    same as the resolver's `needs_local_rows` for every strategy, with or without counters."""
    policy: dict[str, object] = {"strategy": strategy}
    if version_column is not None:
        policy["version_column"] = version_column
    if strategy == "merge":
        policy["merge"] = "json:dumps"
    conflicts: dict[str, object] = dict(policy)
    if override or counters:
        conflicts = {"tables": {"public.t": {**policy, "counters": list(counters)}}}
    settings = settings_from_dict({
        "source": {"name": "s", "dsn": "dbname=s"},
        "sites": [{"name": "a", "dsn": "dbname=a"}],
        "conflicts": conflicts,
    })
    site, table = settings.sites[0], _table()
    resolved = settings.conflicts.for_table(table.qualified)
    expected = (make_resolver(resolved, site=site.name).needs_local_rows,
                resolved.version_column, False)
    assert commands._tombstone_policy(settings, site, table) == expected
    assert commands._tombstone_policy(None, site, table) == (False, None, False)


def test_merge_columns_needs_replica_identity_full_at_the_source() -> None:
    settings = settings_from_dict({
        "source": {"name": "s", "dsn": "dbname=s"},
        "sites": [{"name": "a", "dsn": "dbname=a"}],
        "conflicts": {"strategy": "lww", "tables": {"public.t": {"merge_columns": True}}},
    })
    site, table = settings.sites[0], dataclasses.replace(_table(), replica_identity="d")
    with pytest.raises(ConfigError, match="REPLICA IDENTITY FULL"):
        commands._tombstone_policy(settings, site, table)
    full = _table()
    assert commands._tombstone_policy(settings, site, full) == (True, None, True)

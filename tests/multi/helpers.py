"""Helpers of the multi-directional suite: offices on their own clusters, a mesh of replicators
between them (each office is the source of one replicator whose sites are the other offices),
pausing and resuming it, waiting for convergence, recording writes with their commit time.

Office names double as source names and site names, so the replication origin
`cdc_sync:<source>:<site>` names the office that wrote a row, and LWW ties (equal versions)
break alike everywhere: the larger office name wins.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from cdc_sync import commands
from cdc_sync.config import Settings, settings_from_dict
from cdc_sync.embedded import Cluster
from tests.integration.helpers import (
    PipelineThread,
    connect,
    table_fingerprint,
    wait_until_caught_up,
)

DB = "office"

BUDGETS_DDL = (
    "CREATE TABLE budgets (id int PRIMARY KEY, office text NOT NULL, "
    "spent numeric(14,2) NOT NULL DEFAULT 0)",
    "ALTER TABLE budgets REPLICA IDENTITY FULL",
    "CREATE TABLE grants (id int PRIMARY KEY, office text, amount numeric(12,2), note text, "
    "writer text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())",
)
COUNTERS = {"strategy": "lww", "tables": {"public.budgets": {"counters": ["spent"]}}}


@dataclass
class Office:
    name: str
    cluster: Cluster
    dsn: str

    def execute(self, statement: str, params: Sequence[Any] | None = None) -> None:
        with connect(self.dsn) as conn:
            conn.execute(statement, params)

    def scalar(self, query: str, params: Sequence[Any] | None = None) -> Any:
        with connect(self.dsn) as conn:
            row = conn.execute(query, params).fetchone()
        return None if row is None else row[0]

    def silently(self, statement: str, params: Sequence[Any] | None = None) -> None:
        """Run `statement` as if it had never happened elsewhere: no triggers (so no local-
        delete tombstone) and tagged with a replication origin, so no replicator passes it on.
        """
        with connect(self.dsn) as conn:
            conn.execute("SET session_replication_role = replica")
            if conn.execute("SELECT pg_replication_origin_oid('test:silent')").fetchone() \
                    == (None,):
                conn.execute("SELECT pg_replication_origin_create('test:silent')")
            conn.execute("SELECT pg_replication_origin_session_setup('test:silent')")
            conn.execute(statement, params)
            conn.execute("SELECT pg_replication_origin_session_reset()")

    def rows(self, table: str = "grants") -> list[str]:
        return table_fingerprint(self.dsn, f"public.{table}")

    def write(self, statement: str, params: Sequence[Any] | None = None
              ) -> tuple[datetime, tuple[Any, ...]] | None:
        """Run one write in its own transaction; with a row back, (commit time, that row)."""
        return write_committed(self.dsn, statement, params)


def write_committed(dsn: str, statement: str, params: Sequence[Any] | None = None, *,
                    conn: psycopg.Connection[Any] | None = None
                    ) -> tuple[datetime, tuple[Any, ...]] | None:
    """Run `statement` (a write with RETURNING) in a transaction of its own and commit it.

    Returns None when it returned no row (nothing written), else the transaction's commit
    timestamp (`pg_xact_commit_timestamp`, exactly what the source stream carries) and the
    returned row.
    """
    own = conn is None
    c = conn if conn is not None else connect(dsn, autocommit=False)
    try:
        row = c.execute(statement, params).fetchone()
        if row is None:
            c.rollback()
            return None
        xid = c.execute("SELECT pg_current_xact_id()::text").fetchone()
        c.commit()
        assert xid is not None
        ts = c.execute("SELECT pg_xact_commit_timestamp(xid(%s::xid8))", (xid[0],)).fetchone()
        c.rollback()
        assert ts is not None and ts[0] is not None
        return ts[0], tuple(row)
    finally:
        if own:
            c.close()


def make_offices(make_cluster: Callable[..., Cluster], names: Sequence[str],
                 ddl: Iterable[str] = ()) -> list[Office]:
    """One cluster per office, a database `office` on each, `ddl` run there."""
    statements = list(ddl)
    offices = []
    for name in names:
        cluster = make_cluster()
        dsn = cluster.create_database(DB)
        office = Office(name, cluster, dsn)
        for stmt in statements:
            office.execute(stmt)
        offices.append(office)
    return offices


def office_settings(source: Office, sites: Sequence[Office], *,
                    conflicts: Mapping[str, Any] | None = None,
                    forward_origins: bool = False) -> Settings:
    return settings_from_dict(office_config(source, sites, conflicts=conflicts,
                                            forward_origins=forward_origins))


def office_config(source: Office, sites: Sequence[Office], *,
                  conflicts: Mapping[str, Any] | None = None,
                  forward_origins: bool = False) -> dict[str, Any]:
    """The configuration (as a dict) of the replicator whose source is `source`."""
    data: dict[str, Any] = {
        "source": {"name": source.name, "dsn": source.dsn, "slot": f"cdc_{source.name}",
                   "publication": f"cdc_{source.name}", "forward_origins": forward_origins},
        "sites": [{"name": s.name, "dsn": s.dsn} for s in sites],
    }
    if conflicts:
        data["conflicts"] = dict(conflicts)
    return data


@dataclass
class Mesh:
    """Replicators between offices: `links` maps a source office to its site offices
    (default: every office replicates to every other one)."""

    offices: list[Office]
    conflicts: Mapping[str, Any] | None = None
    links: Mapping[str, Sequence[str]] | None = None
    forward: Mapping[str, bool] = field(default_factory=dict)
    settings: dict[str, Settings] = field(default_factory=dict)
    runners: dict[str, PipelineThread] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_name = {o.name: o for o in self.offices}
        links = self.links or {o.name: [p.name for p in self.offices if p is not o]
                               for o in self.offices}
        for src, sites in links.items():
            self.settings[src] = office_settings(
                by_name[src], [by_name[s] for s in sites], conflicts=self.conflicts,
                forward_origins=self.forward.get(src, False))

    def office(self, name: str) -> Office:
        return next(o for o in self.offices if o.name == name)

    def init(self) -> Mesh:
        for s in self.settings.values():
            commands.init(s)
        return self

    def start(self, *sources: str) -> Mesh:
        for src in sources or tuple(self.settings):
            assert src not in self.runners, f"{src} is already running"
            self.runners[src] = PipelineThread(self.settings[src]).start()
        return self

    def stop(self, *sources: str) -> None:
        errors = []
        for src in sources or tuple(self.runners):
            runner = self.runners.pop(src, None)
            if runner is None:
                continue
            try:
                runner.stop()
            except AssertionError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop every replicator for the block, start them again after it."""
        running = tuple(self.runners)
        self.stop()
        yield
        self.start(*running)

    def caught_up(self, *sources: str, timeout: float = 60) -> None:
        """Every site of every (running) replicator holds what its source committed so far."""
        for src in sources or tuple(self.runners):
            runner = self.runners.get(src)
            wait_until_caught_up(self.settings[src], timeout,
                                 pipeline=runner.pipeline if runner else None)

    def wait_same(self, table: str = "grants", timeout: float = 60, settle: float = 5
                  ) -> list[str]:
        """Catch up every replicator, then require every office to hold the same rows (within
        `settle` seconds: once caught up nothing more is on its way)."""
        self.caught_up(timeout=timeout)
        deadline = time.monotonic() + settle
        while True:
            views = {o.name: o.rows(table) for o in self.offices}
            if len({tuple(v) for v in views.values()}) == 1:
                return next(iter(views.values()))
            if time.monotonic() > deadline:
                raise AssertionError(f"offices differ on {table}: " + describe_difference(views))
            time.sleep(0.2)

    def conflicts_at(self, office: str) -> list[dict[str, Any]]:
        """The conflict log of `office` through `commands.conflicts` (newest first)."""
        for s in self.settings.values():
            if any(site.name == office for site in s.sites):
                return commands.conflicts(s, site=office, limit=100_000)
        raise KeyError(f"{office} is nobody's site")

    def all_conflicts(self) -> list[dict[str, Any]]:
        sites = {site.name for s in self.settings.values() for site in s.sites}
        return [c for name in sorted(sites) for c in self.conflicts_at(name)]

    def close(self) -> None:
        for runner in list(self.runners.values()):
            runner.pipeline.stop()
        for src in list(self.runners):
            runner = self.runners.pop(src)
            runner.thread.join(60)


def describe_difference(views: Mapping[str, Sequence[str]]) -> str:
    names = list(views)
    first = set(views[names[0]])
    parts = [f"{names[0]}: {len(views[names[0]])} rows"]
    for n in names[1:]:
        other = set(views[n])
        parts.append(f"{n}: {len(views[n])} rows, only there {sorted(other - first)[:6]}, "
                     f"missing there {sorted(first - other)[:6]}")
    return "; ".join(parts)


def tuple_counters(dsn: str, tables: Sequence[str]) -> int:
    """n_tup_ins + n_tup_upd + n_tup_del over `tables` (public schema)."""
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
            "WHERE schemaname = 'public' AND relname = ANY(%s)", (list(tables),)).fetchone()
    return int(row[0]) if row else 0


def conflict_kinds(conflicts: Iterable[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    return {(c["kind"], c["strategy"], c["outcome"]) for c in conflicts}


def tombstone_keys(office: Office, table: str = "public.grants") -> dict[str, str | None]:
    """`id` of each key in the office's `cdc_sync.tombstones` -> the source that deleted it
    (None: deleted at the office itself, recorded by the local-delete trigger)."""
    with connect(office.dsn) as conn:
        rows = conn.execute("SELECT key ->> 'id', source FROM cdc_sync.tombstones "
                            "WHERE table_name = %s", (table,)).fetchall()
    return {k: s for k, s in rows}


@contextlib.contextmanager
def mesh(offices: list[Office], **kwargs: Any) -> Iterator[Mesh]:
    """`Mesh(...)`, initialised and running for the block; stopped after."""
    m = Mesh(offices, **kwargs).init().start()
    try:
        yield m
    except BaseException:
        m.close()
        raise
    m.stop()  # raises if a replicator failed


def spent(o: Office) -> dict[int, str]:
    with connect(o.dsn) as conn:
        return {i: str(s) for i, s in conn.execute(
            "SELECT id, spent FROM budgets ORDER BY id").fetchall()}

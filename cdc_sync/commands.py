"""The verbs of `cdc-sync`, as plain functions taking the settings first (the CLI is thin).

Each raises `CdcSyncError` subclasses with one-line messages; none prints. `status` returns
the `status --json` object of ARCHITECTURE.md.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from .bus._format import BUS_MESSAGE_OP
from .config import Settings, SiteSettings, table_matches
from .errors import CdcSyncError, ConfigError, SiteError, SourceError
from .protocol import Lsn
from .sessions import SESSION_OPTIONS, connect_site
from .sinks.schema import migrate_site, register_source
from .source import catalog
from .source.catalog import TableDef
from .source.snapshot import begin_snapshot, check_slot_name, copy_table, exported_snapshot
from .source.stream import describe_connect_error

if TYPE_CHECKING:  # the pipeline and the connectors are imported by the verbs that use them
    from .bus.applier import BusApplier
    from .bus.capture import Capture
    from .bus.metrics import BusCollector
    from .metrics import Metrics
    from .pipeline import Pipeline

log = logging.getLogger(__name__)

CopyProgress = Callable[[str, str, int], None]  # site, table, rows just copied


def connect_source(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=autocommit, options=SESSION_OPTIONS,
                               connect_timeout=10, application_name="cdc_sync")
    except psycopg.OperationalError as exc:
        raise SourceError(f"source: {describe_connect_error(dsn, exc)}") from exc


def connect_site_checked(site: SiteSettings, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    try:
        conn = connect_site(site.dsn)
        conn.autocommit = autocommit
        return conn
    except psycopg.OperationalError as exc:
        raise SiteError(f"site {site.name}: {describe_connect_error(site.dsn, exc)}") from exc


# -- init --------------------------------------------------------------------------------

@dataclass
class InitReport:
    tables: list[str] = field(default_factory=list)
    created_tables: dict[str, list[str]] = field(default_factory=dict)
    copied: dict[str, int] = field(default_factory=dict)  # site -> rows
    slot_created: bool = False
    snapshot_lsn: str | None = None


def source_tables(conn: psycopg.Connection[Any], settings: Settings) -> list[TableDef]:
    return [catalog.describe_table(conn, s, t)
            for s, t in catalog.list_tables(conn, settings.source.tables)]


def site_tables(site: SiteSettings, tables: list[TableDef]) -> list[TableDef]:
    if site.tables is None:
        return tables
    return [t for t in tables if table_matches(site.tables, t.qualified)]


def prepare_site(site: SiteSettings, src: psycopg.Connection[Any], tables: list[TableDef],
                 settings: Settings | None = None, *,
                 migration: Future[None] | None = None) -> list[str]:
    """Migrate our schema, create missing schemas/types/tables, check every source column,
    and attach the local-delete tombstone trigger where the conflict policy needs it.

    `migration` is the site's `migrate_site` already under way (`init` runs it beside the
    rest): it is waited for only if a tombstone trigger needs our schema; the caller waits for
    it before anything else uses the schema. Without it, the site is migrated here first.
    """
    if migration is None:
        migrate_site(site.dsn)
    created: list[str] = []
    with connect_site_checked(site) as conn:
        for t in site_tables(site, tables):
            if _prepare_table(conn, site, src, t):
                created.append(t.qualified)
            policy = _tombstone_policy(settings, site, t)
            if policy[0] and migration is not None:
                migration.result()  # the trigger's function is in our schema
            _ensure_tombstone_trigger(conn, t, policy)
        conn.commit()
    return created


def _tombstone_policy(settings: Settings | None, site: SiteSettings,
                      t: TableDef) -> tuple[bool, str | None, bool]:
    """(whether local deletes need tombstones, the version column, merge_columns) for `t`
    at `site`. merge_columns needs the source table's REPLICA IDENTITY FULL (a `ConfigError`
    saying so otherwise): only a full old row tells which columns an update changed."""
    if settings is None:
        return False, None, False
    policy = settings.conflicts.for_table(t.qualified)
    if policy.merge_columns and t.replica_identity != "f":
        raise ConfigError(
            f'conflicts: {t.qualified} has merge_columns = true but its REPLICA IDENTITY is not '
            f"FULL at the source (run: ALTER TABLE {t.qualified} REPLICA IDENTITY FULL)")
    return policy.needs_local_rows, policy.version_column, policy.merge_columns


def _ensure_tombstone_trigger(conn: psycopg.Connection[Any], t: TableDef,
                              policy: tuple[bool, str | None, bool]) -> None:
    """Local deletes leave tombstones when the table's policy compares versions; with
    merge_columns they keep the deleted row's values, and local inserts and updates record
    which columns they wrote (`cdc_sync.record_column_versions`)."""
    wanted, version_column, columns = policy
    if not wanted or not t.primary_key:
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS cdc_sync_tombstone ON {}").format(t.ident))
        columns = False
    else:
        keys = "{" + ",".join('"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'
                              for k in t.primary_key) + "}"
        conn.execute(sql.SQL(
            "CREATE OR REPLACE TRIGGER cdc_sync_tombstone AFTER DELETE ON {} FOR EACH ROW "
            "EXECUTE FUNCTION cdc_sync.record_tombstone({}, {}, {})").format(
                t.ident, sql.Literal(keys), sql.Literal(version_column or ""),
                sql.Literal("values" if columns else "")))
    if not columns:
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS cdc_sync_columns ON {}").format(t.ident))
        return
    conn.execute(sql.SQL(
        "CREATE OR REPLACE TRIGGER cdc_sync_columns AFTER INSERT OR UPDATE ON {} FOR EACH ROW "
        "EXECUTE FUNCTION cdc_sync.record_column_versions({})").format(
            t.ident, sql.Literal(keys)))


def _prepare_table(conn: psycopg.Connection[Any], site: SiteSettings, src: psycopg.Connection[Any],
                   t: TableDef) -> bool:
    """Create `t` on the site if missing (True), else check it has every source column."""
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(t.schema)))
    for schema, name, kind, definition in catalog.user_types(src, t):
        _ensure_type(conn, schema, name, kind, definition)
    exists = conn.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s", (t.schema, t.name)).fetchone()
    if exists is None:
        conn.execute(catalog.create_site_table_sql(t))
        return True
    have = {r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
        "AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (t.schema, t.name)).fetchall()}
    for col in t.copy_columns:
        if col not in have:
            raise SiteError(f"site {site.name}: table {t.qualified} is missing column "
                            f"{t.qualified}.{col} (add it, or drop the table so "
                            "`cdc-sync init` creates it)")
    return False


def _ensure_type(conn: psycopg.Connection[Any], schema: str, name: str, kind: str,
                 definition: str) -> None:
    exists = conn.execute(
        "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = %s AND t.typname = %s", (schema, name)).fetchone()
    if exists is not None:
        return
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    parts = definition.split("\0")
    ident = sql.Identifier(schema, name)
    if kind == "e":
        conn.execute(sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
            ident, sql.SQL(", ").join(sql.Literal(p) for p in parts if p != "" or len(parts) > 1)))
    elif kind == "c":
        conn.execute(sql.SQL("CREATE TYPE {} AS ({})").format(
            ident, sql.SQL(", ").join(sql.SQL(p) for p in parts if p)))
    else:
        base, notnull, *checks = parts
        conn.execute(sql.SQL("CREATE DOMAIN {} AS {}{}{}").format(
            ident, sql.SQL(base), sql.SQL(" NOT NULL" if notnull else ""),
            sql.SQL("").join(sql.SQL(" ") + sql.SQL(c) for c in checks)))


def _site_has_snapshot(site: SiteSettings, source: str) -> bool:
    with connect_site_checked(site) as conn:
        row = conn.execute("SELECT snapshot_lsn FROM cdc_sync.progress WHERE source = %s",
                           (source,)).fetchone()
    return row is not None and row[0] is not None


def _needing_resync(settings: Settings, exclude: list[SiteSettings]) -> set[str]:
    """With `[bus]`: the sites whose next changes the stream already discarded."""
    if settings.bus is None:
        return set()
    sites: list[dict[str, Any]] = []
    for site in settings.sites:
        if site in exclude:
            continue
        with connect_site_checked(site) as conn:
            row = conn.execute("SELECT applied_lsn::text FROM cdc_sync.progress "
                               "WHERE source = %s", (settings.source.name,)).fetchone()
        if row is not None and row[0]:
            sites.append({"name": site.name, "applied_lsn": row[0]})
    if not sites:
        return set()
    bus = bus_status(settings, sites, None)
    if "error" in bus:  # no stream yet, or the bus is down: nothing to tell, nothing to redo
        log.info("init: cannot check the bus for sites needing a resync: %s", bus["error"])
        return set()
    return {s["name"] for s in bus["sites"] if s["needs_resync"]}


def _copy_site(settings: Settings, site: SiteSettings, tables: list[TableDef], snapshot: str,
               point: Lsn, on_progress: CopyProgress | None, *,
               record_progress: bool = True, migration: Future[None] | None = None,
               replace: bool = False) -> int:
    """Copy `tables` into `site` at `snapshot`, all in one site transaction (with the site's
    progress when `record_progress`). A table still empty (created by this `init` or not)
    gets its indexes built after its rows are in, where `copy_table` can do that. `replace`
    (a site that needs a resync from the bus) deletes the site's rows first. The site's
    schema `migration`, if still running, is waited for before that transaction commits (a
    failed one fails the copy)."""
    total = 0
    with connect_source(settings.source.dsn, autocommit=False) as src, \
            connect_site_checked(site) as dst:
        begin_snapshot(src, snapshot)
        try:
            dst.execute("SET session_replication_role = replica")
        except psycopg.errors.InsufficientPrivilege:
            dst.rollback()
        for t in site_tables(site, tables):
            if replace:  # a resync: the site's rows are replaced by the snapshot's
                dst.execute(sql.SQL("DELETE FROM {}").format(t.ident))
            nonempty = dst.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(t.ident)
                                   ).fetchone()
            merge = bool(nonempty and nonempty[0])

            on_rows = (None if on_progress is None
                       else functools.partial(on_progress, site.name, t.qualified))
            total += copy_table(src, dst, t, merge=merge, on_rows=on_rows,
                                defer_indexes=not merge)
        if migration is not None:
            migration.result()
        if record_progress:
            _record_snapshot(dst, settings.source.name, point)
        dst.commit()
        src.rollback()
    log.info("site %s: initial copy of %d rows at %s", site.name, total, point)
    return total


def _record_snapshot(dst: psycopg.Connection[Any], source: str, point: Lsn) -> None:
    """The site holds `source` as of `point`: its progress starts there."""
    dst.execute(
        "INSERT INTO cdc_sync.progress (source, applied_lsn, snapshot_lsn, updated_at) "
        "VALUES (%s, %s::pg_lsn, %s::pg_lsn, now()) ON CONFLICT (source) DO UPDATE SET "
        "applied_lsn = EXCLUDED.applied_lsn, snapshot_lsn = EXCLUDED.snapshot_lsn, "
        "commit_ts = NULL, updated_at = now()",
        (source, str(point), str(point)))


def _check_conflict_policies(settings: Settings, tables: list[TableDef]) -> None:
    """Counters need old values (REPLICA IDENTITY FULL); version columns must exist."""
    for t in tables:
        policy = settings.conflicts.for_table(t.qualified)
        names = {c.name for c in t.columns}
        if policy.strategy in ("first_write_wins", "merge") and t.replica_identity != "f":
            fix = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(t.ident).as_string(None)
            raise SourceError(f"source: table {t.qualified} uses {policy.strategy}, which must "
                              "see the old row to tell a concurrent update from a later one; "
                              f"run: {fix}")
        if policy.counters and t.replica_identity != "f":
            fix = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(t.ident).as_string(None)
            raise SourceError(f"source: table {t.qualified} has counter columns, which need the "
                              f"old row values; run: {fix}")
        for col in policy.counters:
            if col not in names:
                raise SourceError(f"source: counter column {t.qualified}.{col} does not exist")
        if policy.version_column and policy.strategy != "source_wins" \
                and policy.version_column not in names \
                and policy.table in settings.conflicts.tables:
            raise SourceError(f"source: version column {t.qualified}.{policy.version_column} "
                              "does not exist")


def _check_site_settings(site: SiteSettings, settings: Settings, tables: list[TableDef]) -> None:
    """Commit-time LWW reads commit timestamps on the site: they must be tracked."""
    needs_ts = any(
        (p := settings.conflicts.for_table(t.qualified)).strategy in ("lww", "first_write_wins")
        and p.version_column is None for t in site_tables(site, tables))
    if not needs_ts:
        return
    with connect_site_checked(site, autocommit=True) as conn:
        row = conn.execute("SHOW track_commit_timestamp").fetchone()
    if not row or row[0] != "on":
        raise SiteError(
            f"site {site.name}: track_commit_timestamp is off, but last-write-wins on commit "
            "time needs it (ALTER SYSTEM SET track_commit_timestamp = on; then restart "
            "PostgreSQL), or set [conflicts] version_column")


def init(settings: Settings, *, on_progress: CopyProgress | None = None) -> InitReport:
    """Idempotent set-up of the source, the slot and every site (see ARCHITECTURE.md).

    Once the source passed its checks, the sites' schema migrations (alembic, slow to load on
    a first run) run on their own threads while the rest goes on: each is waited for before
    anything reads or writes its schema (a site's copy commits with its progress only after
    it) and before `init` returns.
    """
    report = InitReport()
    src_cfg = settings.source
    check_slot_name(src_cfg.slot)
    src = connect_source(src_cfg.dsn)
    try:
        tables = source_tables(src, settings)
        report.tables = [t.qualified for t in tables]
        catalog.check_source(src, tables, src_cfg.slot)
        _check_conflict_policies(settings, tables)
    except BaseException:
        src.close()
        raise
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(settings.sites))),
                            thread_name_prefix="cdc_sync-migrate") as pool:
        migrations = {s.name: pool.submit(migrate_site, s.dsn) for s in settings.sites}
        try:
            with src:
                catalog.ensure_publication(src, src_cfg.publication, tables)
                for site in settings.sites:
                    _check_site_settings(site, settings, tables)
                    report.created_tables[site.name] = prepare_site(
                        site, src, tables, settings, migration=migrations[site.name])
                slot = catalog.slot_info(src, src_cfg.slot)
            _copy_sites(settings, tables, slot, report, migrations, on_progress)
            for migration in migrations.values():
                migration.result()
        except BaseException:
            for migration in migrations.values():
                migration.cancel()
            raise
    return report


def _copy_sites(settings: Settings, tables: list[TableDef], slot: dict[str, Any] | None,
                report: InitReport, migrations: dict[str, Future[None]],
                on_progress: CopyProgress | None) -> None:
    """The initial copies `init` owes: every site without one, and the tables it created at
    the others (at a snapshot of the slot, or of a temporary slot when it exists)."""
    src_cfg = settings.source
    if slot is not None and slot["plugin"] != "pgoutput":
        raise SourceError(f"source: slot {src_cfg.slot} uses plugin {slot['plugin']}, not pgoutput")
    if slot is not None and not slot["same_database"]:
        raise SourceError(f"source: slot {src_cfg.slot} belongs to another database")
    # Every site lists this source before its slot exists (`sinks.site.register_source`:
    # commit-time LWW relies on it to know when row versions are needed).
    for site in settings.sites:
        migrations[site.name].result()  # cdc_sync.sources and .progress are used next
        with connect_site_checked(site) as conn:
            register_source(conn, src_cfg.name)
    if slot is None:
        needing = list(settings.sites)
    else:
        needing = [s for s in settings.sites if not _site_has_snapshot(s, src_cfg.name)]
    resync = _needing_resync(settings, needing)
    needing += [s for s in settings.sites if s.name in resync]
    # Sites that had their copy but got new tables (published since): copy just those, at a
    # fresh snapshot; replaying the stream from the site's position afterwards converges.
    new_tables = {
        s.name: [t for t in site_tables(s, tables)
                 if t.qualified in report.created_tables.get(s.name, [])]
        for s in settings.sites if s not in needing}
    new_tables = {k: v for k, v in new_tables.items() if v}
    if slot is not None and (needing or new_tables) and slot["active"] and (
            settings.bus is None or len(needing) > len(resync) or new_tables):
        names = [s.name for s in needing] + list(new_tables)
        raise SourceError(
            f"source: sites {', '.join(names)} need an initial copy; "
            "stop `cdc-sync run` first (the slot is in use)")
    if not needing and not new_tables:
        return
    if slot is None:
        name, temporary = src_cfg.slot, False
        report.slot_created = True
    else:
        name, temporary = f"{src_cfg.slot}_init_{threading.get_native_id()}"[:63], True
    with exported_snapshot(src_cfg.dsn, name, temporary=temporary) as (point, snapshot):
        report.snapshot_lsn = str(point)
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(needing)))) as pool:
            futures = {s.name: pool.submit(
                _copy_site, settings, s, tables, snapshot, point, on_progress,
                migration=migrations[s.name], replace=s.name in resync) for s in needing}
            futures.update({
                name: pool.submit(_copy_site, settings, settings.site(name), only, snapshot,
                                  point, on_progress, record_progress=False,
                                  migration=migrations[name])
                for name, only in new_tables.items()})
            for site_name, fut in futures.items():
                report.copied[site_name] = fut.result()


# -- run ---------------------------------------------------------------------------------

def check_runnable(settings: Settings, *, patience: float | None = None) -> None:
    """Fail fast with one clear line when `run` cannot start at all.

    A slot another process streams from (another `cdc-sync run`, a `pg_recvlogical`) is
    waited for up to `patience` seconds (a previous run's WAL sender may still be exiting),
    then refused with a line naming the slot and the process holding it. Checked here, before
    the pipeline starts: its site workers may never get ready while another run holds their
    replication origins, and its reconnect backoff would stretch the patience.
    """
    if patience is None:
        from .pipeline import SLOT_BUSY_PATIENCE

        patience = SLOT_BUSY_PATIENCE
    slot_name = settings.source.slot
    deadline = time.monotonic() + patience
    warned = False
    while True:
        with connect_source(settings.source.dsn) as src:
            slot = catalog.slot_info(src, slot_name)
            holder = src.execute("SELECT active_pid FROM pg_replication_slots "
                                 "WHERE slot_name = %s AND active", (slot_name,)).fetchone()
        if slot is None:
            raise SourceError(f"source: replication slot {slot_name!r} does not exist "
                              "(run `cdc-sync init` first)")
        if holder is None:
            return
        if time.monotonic() >= deadline:
            raise SourceError(
                f"source: replication slot {slot_name!r} is in use by another process (PID "
                f"{holder[0]}); stop the other `cdc-sync run` using it, or give this one its own "
                "slot")
        if not warned:
            log.warning("replication slot %s is in use by PID %s; waiting up to %.0f s for it",
                        slot_name, holder[0], patience)
            warned = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


RUN_SWITCH_INTERVAL = 0.0005  # seconds; see run()


def run(settings: Settings, *, install_signals: bool = True,
        pipeline: Pipeline | None = None) -> None:
    """Stream until SIGINT/SIGTERM (or `pipeline.stop()`); reconnects on its own."""
    from .connectors.runner import start_runners
    from .pipeline import Pipeline

    if settings.bus is not None and pipeline is None:
        run_bus(settings, install_signals=install_signals)
        return
    check_runnable(settings)
    pipe = pipeline or Pipeline(settings)
    # The stream thread decodes (pure Python, holding the GIL) while each site thread waits on
    # its database; every wait returns into Python and must get the GIL back. With the default
    # 5 ms switch interval a site statement took ~18 ms longer than the server needed (measured
    # with a busy decoding thread); 0.5 ms brings that to ~2 ms. Our own process only: a
    # library embedding the pipeline (RealTimeSync) keeps its application's setting.
    sys.setswitchinterval(min(sys.getswitchinterval(), RUN_SWITCH_INTERVAL))
    if install_signals:
        def handler(signum: int, _frame: object) -> None:
            log.info("received signal %d: stopping", signum)
            pipe.stop()
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    # Connectors deliver from the outbound table on their own threads and connections: a
    # dead endpoint never slows the sites.
    stop_connectors = threading.Event()
    runners = start_runners(settings, stop_connectors)
    try:
        pipe.run()
    finally:
        stop_connectors.set()
        for t in runners:
            t.join(timeout=30)


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping", signum)
        stop()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def capture(settings: Settings, *, install_signals: bool = True,
            metrics: Metrics | None = None) -> None:
    """`cdc-sync capture`: the slot into the bus until SIGINT/SIGTERM (`cdc_sync.bus`)."""
    from .bus.capture import Capture
    from .bus.client import BusClient

    if settings.bus is None:
        raise ConfigError("capture needs a [bus] section (kind, url) in the configuration")
    check_runnable(settings)
    client = BusClient(settings.bus, settings.source.name)
    try:
        client.connect()  # an unreachable bus or a foreign stream: one line, before anything
        client.ensure_stream()
    except BaseException:
        client.close()
        raise
    cap = Capture(settings, client=client)
    cap.bus_connected = True
    collector = _bind_bus_metrics(metrics, cap, None)
    if install_signals:
        _on_signals(cap.stop)
    try:
        cap.run()
    finally:
        client.close()
        if collector is not None:
            collector.close()


def _bind_bus_metrics(metrics: Metrics | None, cap: Capture | None,
                      applier: BusApplier | None) -> BusCollector | None:
    if metrics is None:
        return None
    from .bus.metrics import BusCollector

    collector = BusCollector(cap, applier)
    metrics.bind_collector(collector)
    return collector


def apply(settings: Settings, sites: Sequence[str] | None = None, *,
          install_signals: bool = True, metrics: Metrics | None = None) -> None:
    """`cdc-sync apply`: the bus into `sites` (default: all) until SIGINT/SIGTERM."""
    from .bus.applier import BusApplier

    if settings.bus is None:
        raise ConfigError("apply needs a [bus] section (kind, url) in the configuration")
    for name in sites or ():
        settings.site(name)  # an unknown site: one line naming the known ones
    applier = BusApplier(settings, sites,
                         on_applied=metrics.on_applied if metrics is not None else None)
    _bind_bus_metrics(metrics, None, applier)
    if install_signals:
        _on_signals(applier.stop)
    applier.run()


def run_bus(settings: Settings, *, install_signals: bool = True,
            metrics: Metrics | None = None) -> None:
    """`cdc-sync run` with `[bus]`: capture and the appliers of every site in one process."""
    from .bus.applier import BusApplier
    from .bus.capture import Capture
    from .connectors.runner import start_runners

    check_runnable(settings)
    sys.setswitchinterval(min(sys.getswitchinterval(), RUN_SWITCH_INTERVAL))
    cap = Capture(settings)
    applier = BusApplier(settings,
                         on_applied=metrics.on_applied if metrics is not None else None)
    collector = _bind_bus_metrics(metrics, cap, applier)

    def stop() -> None:
        cap.stop()
        applier.stop()

    if install_signals:
        _on_signals(stop)
    stop_connectors = threading.Event()
    runners = start_runners(settings, stop_connectors)
    t = threading.Thread(target=applier.run, name="bus-apply", daemon=True)
    t.start()
    try:
        cap.run()
    finally:
        applier.stop()
        t.join(timeout=90)
        stop_connectors.set()
        for r in runners:
            r.join(timeout=30)
        if collector is not None:
            collector.close()


# -- status ------------------------------------------------------------------------------

def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds") if ts else None


def status(settings: Settings) -> dict[str, Any]:
    """The `status --json` object."""
    src_cfg = settings.source
    source: dict[str, Any] = {"name": src_cfg.name, "slot": src_cfg.slot, "active": False,
                              "current_lsn": None, "confirmed_flush_lsn": None,
                              "retained_bytes": None}
    current: Lsn | None = None
    confirmed: Lsn | None = None
    with connect_source(src_cfg.dsn) as src:
        slot = catalog.slot_info(src, src_cfg.slot)
        now_row = src.execute("SELECT pg_current_wal_lsn()::text, now()").fetchone()
    assert now_row is not None
    current = Lsn.parse(now_row[0])
    source["current_lsn"] = str(current)
    if slot is not None:
        confirmed = Lsn.parse(slot["confirmed_flush_lsn"]) if slot["confirmed_flush_lsn"] else None
        source.update(active=bool(slot["active"]),
                      confirmed_flush_lsn=str(confirmed) if confirmed is not None else None,
                      retained_bytes=int(slot["retained_bytes"] or 0))
    sites = []
    for site in settings.sites:
        entry: dict[str, Any] = {"name": site.name, "reachable": False, "applied_lsn": None,
                                 "lag_bytes": None, "lag_seconds": None, "last_commit_ts": None}
        try:
            with connect_site_checked(site, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT applied_lsn::text, commit_ts FROM cdc_sync.progress "
                    "WHERE source = %s", (src_cfg.name,)).fetchone()
                counts = conn.execute(
                    "SELECT (SELECT count(*) FROM cdc_sync.dead_letters WHERE NOT resolved), "
                    "(SELECT count(*) FROM cdc_sync.conflicts)").fetchone()
        except (CdcSyncError, psycopg.Error) as exc:
            entry["error"] = str(exc) if isinstance(exc, CdcSyncError) else (
                f"site {site.name}: {' '.join(str(exc).split())}")
            sites.append(entry)
            continue
        entry["reachable"] = True
        if counts is not None:
            entry["dead_letters"], entry["conflicts"] = int(counts[0]), int(counts[1])
        if row is not None:
            applied = Lsn.parse(row[0])
            # Every site holds at least what the slot has confirmed (we confirm the minimum),
            # unless a bus is in between: capture confirms what the stream stored.
            if confirmed is not None and confirmed > applied and settings.bus is None:
                applied = confirmed
            lag = max(0, current - applied)
            entry.update(applied_lsn=str(applied), lag_bytes=lag,
                         last_commit_ts=_iso(row[1]))
            if lag == 0:
                entry["lag_seconds"] = 0.0
            elif row[1] is not None:
                entry["lag_seconds"] = round(max(0.0, (now_row[1] - row[1]).total_seconds()), 3)
        sites.append(entry)
    result: dict[str, Any] = {"source": source, "sites": sites}
    if settings.connectors:
        from .connectors.runner import connector_status

        try:
            result["connectors"] = connector_status(settings)
        except CdcSyncError as exc:
            result["connectors"] = [{"name": c.name, "error": str(exc)} for c in settings.connectors]
    if settings.bus is not None:
        result["bus"] = bus_status(settings, sites, confirmed)
    limit = src_cfg.max_retained_bytes
    if source["retained_bytes"] is not None and source["retained_bytes"] > limit:
        source["warning"] = (f"slot retains {source['retained_bytes']} bytes of WAL, over "
                             f"max_retained_bytes {limit}; held back by {_holding_back(sites)}")
        log.warning("%s", source["warning"])
    return result


def bus_status(settings: Settings, sites: list[dict[str, Any]],
               capture_lsn: Lsn | None) -> dict[str, Any]:
    """The `bus` object of `status --json`: the stream's figures, capture's position (the
    slot's confirmed position: capture confirms only what the stream stored) and, per site,
    the messages still to apply, or `needs_resync` when retention discarded some of them."""
    from .bus.applier import find_start
    from .bus.client import BusClient

    assert settings.bus is not None
    client = BusClient(settings.bus, settings.source.name)
    out: dict[str, Any] = {"stream": client.stream, "reachable": False, "messages": None,
                           "bytes": None, "first_seq": None, "last_seq": None,
                           "capture_lsn": str(capture_lsn) if capture_lsn else None,
                           "sites": []}
    try:
        client.connect()
        state = client.state()
        out.update(reachable=True, messages=state.messages, bytes=state.bytes,
                   first_seq=state.first_seq, last_seq=state.last_seq)
        for site in sites:
            applied = site.get("applied_lsn")
            entry: dict[str, Any] = {"name": site["name"], "pending_messages": None,
                                     "needs_resync": False}
            if applied:
                start, gone = find_start(client, state, Lsn.parse(applied))
                entry["pending_messages"] = max(0, state.last_seq - start + 1)
                entry["needs_resync"] = gone
            out["sites"].append(entry)
    except CdcSyncError as exc:
        out["error"] = str(exc)
    finally:
        client.close()
    return out


def _holding_back(sites: list[dict[str, Any]]) -> str:
    """The sites the slot waits for: those whose position is unknown (unreachable, or never
    applied anything: the slot cannot move past them), else those furthest behind."""
    unknown = [s for s in sites if not s.get("applied_lsn")]
    if unknown:
        names = [s["name"] + ("" if s["reachable"] else " (unreachable)") for s in unknown]
    elif sites:
        lowest = min(Lsn.parse(s["applied_lsn"]) for s in sites)
        names = [s["name"] for s in sites if Lsn.parse(s["applied_lsn"]) == lowest]
    else:
        return "no site"
    return f"site{'s' if len(names) > 1 else ''} {', '.join(names)}"


# -- teardown ----------------------------------------------------------------------------

def teardown(settings: Settings) -> list[str]:
    """Drop the slot and the publication; return what was dropped."""
    dropped: list[str] = []
    src_cfg = settings.source
    with connect_source(src_cfg.dsn) as src:
        slot = catalog.slot_info(src, src_cfg.slot)
        deadline = time.monotonic() + 10
        while slot is not None and slot["active"] and time.monotonic() < deadline:
            # A replicator that just stopped may still be releasing the slot.
            time.sleep(0.2)
            slot = catalog.slot_info(src, src_cfg.slot)
        if slot is not None:
            if slot["active"]:
                raise SourceError(f"source: slot {src_cfg.slot} is in use; stop `cdc-sync run` "
                                  "first")
            src.execute("SELECT pg_drop_replication_slot(%s)", (src_cfg.slot,))
            dropped.append(f"slot {src_cfg.slot}")
        pub = src.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                          (src_cfg.publication,)).fetchone()
        if pub is not None:
            src.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(src_cfg.publication)))
            dropped.append(f"publication {src_cfg.publication}")
    return dropped


# -- conflicts and dead letters ------------------------------------------------------------

def _sites(settings: Settings, name: str | None) -> list[SiteSettings]:
    return [settings.site(name)] if name else list(settings.sites)


def _per_site(settings: Settings, site: str | None, query: str, params: tuple[Any, ...],
              row: Callable[[tuple[Any, ...]], dict[str, Any]]) -> list[dict[str, Any]]:
    """`query` at each site (or only `site`), each row mapped by `row` and tagged with the
    site's name, in site order."""
    out: list[dict[str, Any]] = []
    for s in _sites(settings, site):
        with connect_site_checked(s, autocommit=True) as conn:
            rows = conn.execute(query, params).fetchall()
        out.extend({"site": s.name, **row(r)} for r in rows)
    return out


def conflicts(settings: Settings, *, site: str | None = None, limit: int = 50
              ) -> list[dict[str, Any]]:
    """The newest conflicts resolved at each site (newest first)."""
    return _per_site(
        settings, site,
        "SELECT id, source, table_name, kind, key, local_row, incoming_row, strategy, "
        "outcome, lsn::text, commit_ts, detected_at FROM cdc_sync.conflicts "
        "ORDER BY id DESC LIMIT %s", (limit,),
        lambda r: {"id": r[0], "source": r[1], "table": r[2], "kind": r[3], "key": r[4],
                   "local_row": r[5], "incoming_row": r[6], "strategy": r[7],
                   "outcome": r[8], "lsn": r[9], "commit_ts": _iso(r[10]),
                   "detected_at": _iso(r[11])})


def dead_letters(settings: Settings, *, site: str | None = None, include_resolved: bool = False
                 ) -> list[dict[str, Any]]:
    """Changes the sites rejected and set aside (oldest first)."""
    return _per_site(
        settings, site,
        "SELECT id, source, table_name, op, key, row_data, old_row, lsn::text, commit_ts, "
        "error, sqlstate, created_at, retried_at, resolved FROM cdc_sync.dead_letters "
        "WHERE resolved = false OR %s ORDER BY id", (include_resolved,),
        lambda r: {"id": r[0], "source": r[1], "table": r[2], "op": r[3], "key": r[4],
                   "row": r[5], "old": r[6], "lsn": r[7], "commit_ts": _iso(r[8]),
                   "error": r[9], "sqlstate": r[10], "created_at": _iso(r[11]),
                   "retried_at": _iso(r[12]), "resolved": r[13]})


@dataclass
class RetryReport:
    resolved: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def retry_dead_letters(settings: Settings, *, site: str | None = None, ids: list[int] | None = None
                       ) -> dict[str, RetryReport]:
    """Re-apply dead letters from the source's current row: the newest state wins.

    For each unresolved dead letter (or those in `ids`) the row with its key is read from the
    source now; if it exists it is upserted on the site, else the site's row is deleted. A
    success marks the dead letter resolved; a failure records the new error. A bus message
    that was not ours (op `bus_message`) has nothing to re-apply: retrying resolves it.
    """
    reports: dict[str, RetryReport] = {}
    with connect_source(settings.source.dsn) as src:
        for s in _sites(settings, site):
            report = reports.setdefault(s.name, RetryReport())
            with connect_site_checked(s) as conn:
                rows = conn.execute(
                    "SELECT id, table_name, key, op FROM cdc_sync.dead_letters WHERE NOT resolved "
                    "AND source = %s AND (%s::bigint[] IS NULL OR id = ANY(%s)) ORDER BY id",
                    (settings.source.name, ids, ids)).fetchall()
                conn.commit()
                for dl_id, table_name, key, op in rows:
                    try:
                        if op != BUS_MESSAGE_OP:  # a bus message not ours: nothing to re-apply
                            _resync_key(src, conn, table_name, key)
                        conn.execute("UPDATE cdc_sync.dead_letters SET resolved = true, "
                                     "retried_at = now() WHERE id = %s", (dl_id,))
                        conn.commit()
                        report.resolved.append(dl_id)
                    except (psycopg.Error, CdcSyncError) as exc:
                        conn.rollback()
                        msg = " ".join(str(exc).split())
                        conn.execute("UPDATE cdc_sync.dead_letters SET retried_at = now(), "
                                     "error = %s WHERE id = %s", (msg, dl_id))
                        conn.commit()
                        report.failed[dl_id] = msg
    return reports


def _resync_key(src: psycopg.Connection[Any], dst: psycopg.Connection[Any], table_name: str,
                key: dict[str, Any] | None) -> None:
    if not key:
        raise SiteError(f"dead letter for {table_name} has no key to re-read; fix it by hand")
    schema, name = _source_table_named(src, table_name)
    t = catalog.describe_table(src, schema, name)
    cols = t.copy_columns
    ident = _ident(src, schema, name)
    where = sql.SQL(" AND ").join(sql.SQL("{}::text = %s").format(_ident(src, k)) for k in key)
    row = src.execute(sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(_ident(src, c)) for c in cols),
        ident, where), list(key.values())).fetchone()
    dst.execute(sql.SQL("DELETE FROM {} WHERE {}").format(ident, where), list(key.values()))
    if row is not None:
        types = {c.name: c.type_sql for c in t.columns}
        dst.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            ident, sql.SQL(", ").join(_ident(src, c) for c in cols),
            sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(types[c].replace("%", "%%")))
                               for c in cols)),
            list(row))


def _source_table_named(src: psycopg.Connection[Any], table_name: str) -> tuple[str, str]:
    """(schema, table) of the source table whose "schema.table" is `table_name` (either part
    may contain dots, so the name is looked up, not split)."""
    rows = src.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname || '.' || c.relname = %s",
        (table_name,)).fetchall()
    if len(rows) != 1:
        what = "no" if not rows else "more than one"
        raise SiteError(f"dead letter for {table_name}: {what} source table has that name; "
                        "fix it by hand")
    return rows[0][0], rows[0][1]


def _ident(conn: psycopg.Connection[Any], *names: str) -> sql.Composable:
    """A quoted (qualified) identifier for a statement executed with parameters: psycopg reads
    every "%" of the query as a placeholder, even inside a quoted identifier, so double it."""
    return sql.SQL(sql.Identifier(*names).as_string(conn).replace("%", "%%"))

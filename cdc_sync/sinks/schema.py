"""The `cdc_sync` schema in every site database, managed by alembic.

Contract:
- `migrate_site(dsn)` creates schema `cdc_sync` and upgrades it to the head revision, with
  `alembic_version` inside `cdc_sync`. It is idempotent. The whole upgrade is one transaction
  (PostgreSQL DDL is transactional, so a failed upgrade leaves nothing half-made) that first
  takes `pg_advisory_xact_lock(MIGRATION_LOCK_KEY)`: concurrent callers, in any process,
  run one after the other and the later ones find nothing to do.
- `schema_version(dsn)` is the revision a site is at, or None before its first migration.
- Every failure is a one-line `SiteError` naming the site as host:port/database; passwords
  never appear (messages go through `mask_dsn`).
- The alembic script directory is `cdc_sync/_migrations` in a wheel (pyproject's hatch
  force-include puts it there), else `migrations/` beside the package in a checkout. The alembic
  `Config` is built here; no alembic.ini is needed.
- A DSN may be a postgresql:// URL or a key=value string; connections go through psycopg 3
  (SQLAlchemy's `postgresql+psycopg` dialect) with a connect timeout unless the DSN sets one.
- A site already at the head revision costs one plain psycopg query: `migrate_site` first reads
  `cdc_sync.alembic_version` and compares it with the head found by reading the revision files
  (`light_head_revision`); alembic and SQLAlchemy (slow to import) are imported only when a
  migration may be needed, or when the revision files cannot be read that simply.
- `register_source(conn, source)` lists `source` in `cdc_sync.sources` (the sources applying
  into the site; see `_locks` and migration 0005).
- A fresh site (no `cdc_sync.alembic_version`, and no schema `cdc_sync` or an empty one) is
  created without alembic too: `schema_head.sql` beside this module is what alembic's offline
  mode renders for base -> head (`render_head_sql`; regenerate it with
  `python -m cdc_sync.sinks.schema --render-head-sql`, tests/test_schema_sql.py checks it is
  current). It runs in one transaction under the migration lock, after checking again that the
  site is still fresh; when it does not apply (the file stamps another revision than the head,
  the site is not fresh) or anything fails, the alembic path below does the work (and reports
  errors).
"""

from __future__ import annotations

import functools
import gc
import io
import logging
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cdc_sync.errors import SiteError, dsn_label, mask_dsn

from ._locks import REGISTER_SQL

if TYPE_CHECKING:  # alembic and SQLAlchemy are imported where used: they are slow to import
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine

__all__ = [
    "HEAD_SQL",
    "MIGRATION_LOCK_KEY",
    "SCHEMA",
    "alembic_config",
    "head_revision",
    "head_sql",
    "light_head_revision",
    "make_engine",
    "migrate_site",
    "prepare_schema",
    "register_source",
    "render_head_sql",
    "schema_version",
    "script_location",
    "site_label",
]

log = logging.getLogger(__name__)

SCHEMA = "cdc_sync"
# One advisory lock key for "migrating the cdc_sync schema": the bytes of b"cdc_sync".
MIGRATION_LOCK_KEY = int.from_bytes(b"cdc_sync", "big")
DEFAULT_CONNECT_TIMEOUT = 5  # seconds, when the DSN does not say
# base -> head as alembic's offline mode renders it (`render_head_sql`), for fresh sites.
HEAD_SQL = Path(__file__).resolve().with_name("schema_head.sql")

# alembic's `context` and `op` are module-level proxies, not thread-local: two upgrades in
# one process must not overlap, whatever the database lock says.
_ALEMBIC_LOCK = threading.Lock()

_CONNECT_PREFIX = re.compile(
    r"^(?:connection failed:\s*)?(?:connection to server (?:at|on) .*? failed:\s*)?", re.I)


def script_location() -> Path:
    """The alembic script directory: installed `_migrations`, else the checkout's `migrations`."""
    package = Path(__file__).resolve().parent.parent  # .../cdc_sync
    installed = package / "_migrations"
    if installed.is_dir():
        return installed
    return package.parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic `Config` for our script directory; `connection` is handed to env.py."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(script_location()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this version of cdc_sync knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise SiteError(f"no migrations found in {script_location()}")
    return head


def site_label(dsn: str) -> str:
    """`host:port/database` for messages (see `errors.dsn_label`)."""
    return dsn_label(dsn)


def make_engine(dsn: str) -> Engine:
    """A SQLAlchemy engine (`postgresql+psycopg`, no pool) for a URL or key=value DSN.

    The DSN goes to psycopg unchanged, so everything libpq accepts (several hosts, a socket
    directory, sslmode, percent-encoded passwords) works without a SQLAlchemy URL round trip.
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise SiteError("site database: not a valid PostgreSQL connection string") from exc
    extra: dict[str, object] = {}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT

    def connect() -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(dsn, **extra)  # type: ignore[arg-type]

    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    return sa.create_engine("postgresql+psycopg://", creator=connect, poolclass=NullPool)


def prepare_schema(connection: Connection) -> None:
    """In the caller's transaction: take the migration lock, then create the schema."""
    import sqlalchemy as sa

    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                       {"key": MIGRATION_LOCK_KEY})
    # Under the lock: CREATE SCHEMA IF NOT EXISTS alone can still fail with a unique
    # violation when two sessions race on pg_namespace.
    connection.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))


def migrate_site(dsn: str) -> None:
    """Create or upgrade the `cdc_sync` schema of the site at `dsn` to the head revision."""
    label = site_label(dsn)
    head = light_head_revision()
    if head is not None and _quick_migrate(dsn, label, head):
        return
    import sqlalchemy as sa
    from alembic import command
    from alembic.util import CommandError

    _settle_imports()
    engine = make_engine(dsn)
    try:
        with _ALEMBIC_LOCK, engine.begin() as connection:
            prepare_schema(connection)
            before = _current(connection)
            command.upgrade(alembic_config(connection), "head")
            after = _current(connection)
    except (sa.exc.DBAPIError, psycopg.Error, CommandError) as exc:
        raise _site_error(label, exc, "cannot migrate the cdc_sync schema") from exc
    finally:
        engine.dispose()
    if before != after:
        log.info("site %s: cdc_sync schema migrated from %s to %s", label, before, after)
    else:
        log.debug("site %s: cdc_sync schema already at %s", label, after)


_SETTLED = threading.Event()


def _settle_imports() -> None:
    """Once per process, after alembic and SQLAlchemy are imported: move every object the
    cyclic garbage collector tracks by then (mostly those modules' hundreds of thousands,
    alive as long as the process) out of its sight (`gc.freeze`). Otherwise each full
    collection walks them again, and so does the interpreter's exit: about 0.1 s added to
    every `cdc-sync init` that migrated a site."""
    if not _SETTLED.is_set():
        _SETTLED.set()
        gc.freeze()


def schema_version(dsn: str) -> str | None:
    """The revision of the site's `cdc_sync` schema, or None if it was never migrated."""
    label = site_label(dsn)
    import sqlalchemy as sa

    engine = make_engine(dsn)
    try:
        with engine.connect() as connection:
            return _current(connection)
    except (sa.exc.DBAPIError, psycopg.Error) as exc:
        raise _site_error(label, exc, "cannot read the cdc_sync schema version") from exc
    finally:
        engine.dispose()


_REVISION = re.compile(r"^revision\s*(?::[^=\n]*)?=\s*[\"']([^\"'\n]+)[\"']\s*$", re.M)
_DOWN_REVISION = re.compile(
    r"^down_revision\s*(?::[^=\n]*)?=\s*(?:None|[\"']([^\"'\n]+)[\"'])\s*$", re.M)


@functools.cache
def light_head_revision() -> str | None:
    """The head revision, found by reading the revision files as text (no alembic import).

    Each file must state `revision = "…"` and `down_revision = "…"` (or None) plainly, once,
    and they must form a single chain; otherwise None (ask alembic: `head_revision`).
    """
    versions = script_location() / "versions"
    revisions: dict[str, str | None] = {}
    try:
        files = sorted(versions.glob("*.py"))
        for path in files:
            text = path.read_text(encoding="utf-8")
            rev = _REVISION.findall(text)
            down = list(_DOWN_REVISION.finditer(text))
            if len(rev) != 1 or len(down) != 1 or rev[0] in revisions:
                return None
            revisions[rev[0]] = down[0].group(1)
    except OSError:
        return None
    downs = list(revisions.values())
    heads = [r for r in revisions if r not in downs]
    roots = [r for r, d in revisions.items() if d is None]
    if len(heads) != 1 or len(roots) != 1 or len(set(downs)) != len(downs) \
            or any(d is not None and d not in revisions for d in downs):
        return None
    return heads[0]


def _connect_plain(dsn: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
    """A plain psycopg connection, with the default connect timeout unless the DSN sets one."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise SiteError("site database: not a valid PostgreSQL connection string") from exc
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
    return psycopg.connect(dsn, **kwargs)


def _quick_migrate(dsn: str, label: str, head: str) -> bool:
    """With one plain psycopg connection: True if the site is already at `head`, or was fresh
    and is now created from `schema_head.sql`; False when alembic has to look (the site is
    behind or odd, the SQL file does not apply, or anything failed: alembic then says why)."""
    try:
        conn = _connect_plain(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        if exc.sqlstate is None:  # no session at all: alembic would fail the same way
            raise _site_error(label, exc, "cannot migrate the cdc_sync schema") from exc
        return False  # e.g. no such database: alembic's path says so
    try:
        with conn:
            versions = _read_versions(conn)
            if versions == [head]:
                log.debug("site %s: cdc_sync schema already at %s", label, head)
                return True
            if versions is not None:
                return False
            script = head_sql(head)
            if script is None:
                return False
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                # Under the lock: another session may have migrated the site meanwhile.
                versions = _read_versions(conn)
                if versions == [head]:
                    log.debug("site %s: cdc_sync schema already at %s", label, head)
                    return True
                if versions is not None or not _schema_is_empty(conn):
                    return False
                conn.execute(script)
                if _read_versions(conn) != [head]:
                    raise _NotApplied
    except (psycopg.Error, _NotApplied) as exc:
        log.debug("site %s: creating the cdc_sync schema without alembic failed (%s);"
                  " trying alembic", label, exc)
        return False
    log.info("site %s: cdc_sync schema created at %s", label, head)
    return True


class _NotApplied(Exception):
    """`schema_head.sql` ran but did not leave the site at the head revision."""


def _read_versions(conn: psycopg.Connection[tuple[Any, ...]]) -> list[str] | None:
    """The revisions in the site's `cdc_sync.alembic_version`, or None without that table.

    Whether the table exists is read from pg_class itself, with the statement's snapshot, not
    by name lookup (`to_regclass`): a session's catalog caches only learn of other sessions'
    DDL at certain points, so a lookup made again after waiting for the migration lock could
    still miss a table committed meanwhile.
    """
    exists = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = 'alembic_version')", (SCHEMA,)).fetchone()
    if not exists or not exists[0]:
        return None
    rows = conn.execute(sql.SQL("SELECT version_num FROM {}").format(
        sql.Identifier(SCHEMA, "alembic_version"))).fetchall()
    return [str(r[0]) for r in rows]


def _schema_is_empty(conn: psycopg.Connection[tuple[Any, ...]]) -> bool:
    """True if schema `cdc_sync` does not exist or holds nothing (every object in a schema,
    whatever its kind, depends on it in pg_depend: that is what DROP SCHEMA checks)."""
    row = conn.execute(
        "SELECT NOT EXISTS (SELECT FROM pg_catalog.pg_depend d"
        " JOIN pg_catalog.pg_namespace n ON n.oid = d.refobjid"
        " WHERE d.refclassid = 'pg_catalog.pg_namespace'::regclass AND n.nspname = %s)",
        (SCHEMA,)).fetchone()
    return bool(row and row[0])


_STAMP = re.compile(
    r"^(?:INSERT INTO \S+\.alembic_version \(version_num\) VALUES \('([^']+)'\)"
    r"|UPDATE \S+\.alembic_version SET version_num='([^']+)')", re.M)


@functools.cache
def head_sql(head: str) -> bytes | None:
    """The statements of `schema_head.sql` (without its BEGIN and COMMIT: the caller runs
    them in its own transaction) if the file stamps `head` last; else None."""
    try:
        text = HEAD_SQL.read_text(encoding="utf-8")
    except OSError:
        return None
    stamps = _STAMP.findall(text)
    if not stamps or (stamps[-1][0] or stamps[-1][1]) != head:
        return None
    body = text.strip()
    if not (body.startswith("BEGIN;") and body.endswith("COMMIT;")):
        return None
    return body.removeprefix("BEGIN;").removesuffix("COMMIT;").strip().encode()


def render_head_sql() -> str:
    """base -> head as SQL, rendered by alembic's offline mode (what `schema_head.sql` holds).

    Configured as migrations/env.py's offline mode (schema first, `alembic_version` in
    `cdc_sync`, one transaction), plus the `named` paramstyle: with the default `pyformat`,
    every `%` in `op.execute` text comes out doubled (`%I` as `%%I` in 0002's function), which
    is not what an online upgrade runs.
    """
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    out = io.StringIO()

    def upgrade(rev: Any, context: Any) -> Any:
        return script._upgrade_revs("head", rev)

    with EnvironmentContext(config, script, fn=upgrade, as_sql=True, starting_rev=None,
                            destination_rev="head") as env:
        env.configure(dialect_name="postgresql", dialect_opts={"paramstyle": "named"},
                      literal_binds=True, version_table_schema=SCHEMA, output_buffer=out)
        with env.begin_transaction():
            env.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            env.run_migrations()
    return out.getvalue()


def _current(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table_schema": SCHEMA})
    return context.get_current_revision()


def _site_error(label: str, exc: BaseException, doing: str) -> SiteError:
    cause: BaseException = exc
    sa_exc = sys.modules.get("sqlalchemy.exc")  # not imported: `exc` is not SQLAlchemy's
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        cause = exc.orig
    if isinstance(cause, psycopg.OperationalError) and getattr(cause, "sqlstate", None) is None:
        # No SQLSTATE: libpq never got a session (refused, timeout, unknown host, auth).
        return SiteError(f"site database {label}: cannot connect: {_reason(cause)}")
    sqlstate = getattr(cause, "sqlstate", None)
    code = f" [{sqlstate}]" if sqlstate else ""
    return SiteError(f"site database {label}: {doing}: {_reason(cause)}{code}")


def _reason(exc: BaseException) -> str:
    """The first meaningful line of a driver message, without libpq's connection preamble."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # psycopg reports several attempts as "...All failures were:" then "- host: ...: error".
    if lines[0].lower().startswith("multiple connection attempts failed") and len(lines) > 1:
        first = lines[1].lstrip("- ")
        lines = [first.split("error: ", 1)[-1]]
    reason = _CONNECT_PREFIX.sub("", lines[0])
    reason = re.sub(r"^(FATAL|ERROR):\s+", "", reason)
    return mask_dsn(reason or lines[0])

def register_source(conn: psycopg.Connection[Any], source: str) -> bool:
    """Record in `cdc_sync.sources` that `source` applies into this site (committed; a no-op
    when it is there). Taken under the registry lock (`_locks`): waits for the resolving
    target transactions in flight. False: the site's schema predates the registry (revision
    0005; `cdc-sync init` migrates it), nothing done."""
    try:
        row = conn.execute("SELECT 1 FROM cdc_sync.sources WHERE source = %s",
                           (source,)).fetchone()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        return False
    if row is None:
        conn.execute(REGISTER_SQL[0])
        conn.execute(REGISTER_SQL[1], (source,))
    conn.commit()
    return True



def main(argv: list[str] | None = None) -> int:
    """`python -m cdc_sync.sinks.schema --render-head-sql [--check]`."""
    import argparse  # only this tool uses it: not on `init`'s path

    parser = argparse.ArgumentParser(prog="python -m cdc_sync.sinks.schema")
    parser.add_argument("--render-head-sql", action="store_true", required=True,
                        help=f"render base -> head with alembic into {HEAD_SQL.name}")
    parser.add_argument("--check", action="store_true",
                        help="only say whether the file is current (exit status 1 if not)")
    args = parser.parse_args(argv)
    rendered = render_head_sql()
    current = HEAD_SQL.read_text(encoding="utf-8") if HEAD_SQL.exists() else None
    if args.check:
        print(f"{HEAD_SQL}: {'current' if current == rendered else 'OUT OF DATE'}")
        return 0 if current == rendered else 1
    if current != rendered:
        HEAD_SQL.write_text(rendered, encoding="utf-8")
    print(f"{HEAD_SQL}: {'unchanged' if current == rendered else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


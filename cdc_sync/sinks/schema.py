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
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from cdc_sync.errors import SiteError, dsn_label, mask_dsn

__all__ = [
    "MIGRATION_LOCK_KEY",
    "SCHEMA",
    "alembic_config",
    "head_revision",
    "make_engine",
    "migrate_site",
    "prepare_schema",
    "schema_version",
    "script_location",
    "site_label",
]

log = logging.getLogger(__name__)

SCHEMA = "cdc_sync"
# One advisory lock key for "migrating the cdc_sync schema": the bytes of b"cdc_sync".
MIGRATION_LOCK_KEY = int.from_bytes(b"cdc_sync", "big")
DEFAULT_CONNECT_TIMEOUT = 5  # seconds, when the DSN does not say

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
    config = Config()
    config.set_main_option("script_location", str(script_location()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this version of cdc_sync knows."""
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

    return sa.create_engine("postgresql+psycopg://", creator=connect, poolclass=NullPool)


def prepare_schema(connection: Connection) -> None:
    """In the caller's transaction: take the migration lock, then create the schema."""
    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                       {"key": MIGRATION_LOCK_KEY})
    # Under the lock: CREATE SCHEMA IF NOT EXISTS alone can still fail with a unique
    # violation when two sessions race on pg_namespace.
    connection.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))


def migrate_site(dsn: str) -> None:
    """Create or upgrade the `cdc_sync` schema of the site at `dsn` to the head revision."""
    label = site_label(dsn)
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


def schema_version(dsn: str) -> str | None:
    """The revision of the site's `cdc_sync` schema, or None if it was never migrated."""
    label = site_label(dsn)
    engine = make_engine(dsn)
    try:
        with engine.connect() as connection:
            return _current(connection)
    except (sa.exc.DBAPIError, psycopg.Error) as exc:
        raise _site_error(label, exc, "cannot read the cdc_sync schema version") from exc
    finally:
        engine.dispose()


def _current(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table_schema": SCHEMA})
    return context.get_current_revision()


def _site_error(label: str, exc: BaseException, doing: str) -> SiteError:
    cause: BaseException = exc
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
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

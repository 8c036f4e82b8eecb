"""Alembic environment for the `cdc_sync` schema in a site database.

- Programmatic (the normal way): `cdc_sync.sinks.schema.migrate_site` puts an open SQLAlchemy
  connection in `config.attributes["connection"]`, already inside a transaction that holds the
  migration lock and has created the schema. Everything runs in that one transaction.
- By hand, online: `alembic -x dsn=postgresql://... upgrade head` (or `sqlalchemy.url`); the
  same lock and schema creation are done here.
- Offline (`--sql`): prints the DDL, schema creation included.

`alembic_version` lives in the `cdc_sync` schema, never in the site's own `public`.
"""

from __future__ import annotations

from alembic import context

SCHEMA = "cdc_sync"

config = context.config


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or "postgresql://",
        dialect_name="postgresql",
        literal_binds=True,
        version_table_schema=SCHEMA,
        # pyformat (the default) would double every % of op.execute text in the output
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        context.run_migrations()


def run_with(connection: object) -> None:
    context.configure(connection=connection, version_table_schema=SCHEMA)  # type: ignore[arg-type]
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    from cdc_sync.sinks.schema import make_engine, prepare_schema

    dsn = context.get_x_argument(as_dictionary=True).get("dsn") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not dsn:
        raise SystemExit("cdc_sync migrations: give -x dsn=... or sqlalchemy.url")
    engine = make_engine(dsn)
    try:
        with engine.begin() as conn:
            prepare_schema(conn)
            run_with(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()

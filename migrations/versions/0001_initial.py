"""Initial cdc_sync schema: progress, conflicts, dead letters, tombstones, outbox, connectors.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = "cdc_sync"


class PgLsn(sa.types.UserDefinedType[str]):
    """PostgreSQL's `pg_lsn`; values travel in its text form "X/Y"."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "pg_lsn"


class BigSerial(sa.types.UserDefinedType[int]):
    """`bigserial` for a column that is not the primary key (SQLAlchemy only infers it there)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "bigserial"


def _ts(name: str, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, sa.TIMESTAMP(timezone=True), **kw)


def _now(name: str) -> sa.Column[Any]:
    return _ts(name, nullable=False, server_default=sa.func.now())


def upgrade() -> None:
    op.create_table(
        "progress",
        sa.Column("source", sa.Text, primary_key=True),
        sa.Column("applied_lsn", PgLsn(), nullable=False,
                  comment="end LSN of the last source transaction this site holds"),
        _ts("commit_ts", comment="source commit time of that transaction"),
        sa.Column("snapshot_lsn", PgLsn(),
                  comment="set once the initial copy is made: its consistent point"),
        _now("updated_at"),
        schema=SCHEMA,
        comment="per source: what this site has applied; written with the rows it covers",
    )
    op.create_table(
        "conflicts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("table_name", sa.Text, nullable=False),
        sa.Column("kind", sa.Text),
        sa.Column("key", postgresql.JSONB),
        sa.Column("local_row", postgresql.JSONB),
        sa.Column("incoming_row", postgresql.JSONB),
        sa.Column("strategy", sa.Text),
        sa.Column("outcome", sa.Text),
        sa.Column("lsn", PgLsn()),
        _ts("commit_ts"),
        _now("detected_at"),
        schema=SCHEMA,
        comment="conflicts the resolver met and what it did",
    )
    op.create_index("conflicts_detected_at_idx", "conflicts", ["detected_at"], schema=SCHEMA)
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("table_name", sa.Text),
        sa.Column("op", sa.Text),
        sa.Column("key", postgresql.JSONB),
        sa.Column("row_data", postgresql.JSONB),
        sa.Column("old_row", postgresql.JSONB),
        sa.Column("lsn", PgLsn()),
        _ts("commit_ts"),
        sa.Column("error", sa.Text),
        sa.Column("sqlstate", sa.Text),
        _now("created_at"),
        _ts("retried_at"),
        sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.false()),
        schema=SCHEMA,
        comment="changes this site rejected; retried by `cdc-sync dead-letters retry`",
    )
    op.create_table(
        "tombstones",
        sa.Column("table_name", sa.Text, primary_key=True),
        sa.Column("key", postgresql.JSONB, primary_key=True),
        _ts("deleted_at", nullable=False),
        sa.Column("version", sa.Text, comment="the deleted row's version column value, if any"),
        sa.Column("source", sa.Text),
        sa.Column("lsn", PgLsn()),
        schema=SCHEMA,
        comment="recently deleted keys, so a late update does not resurrect a row",
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Text, primary_key=True, comment="the event id"),
        sa.Column("seq", BigSerial(), nullable=False, unique=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("event", postgresql.JSONB, nullable=False),
        _ts("commit_ts"),
        _now("created_at"),
        schema=SCHEMA,
        comment="the outbound connector table: events waiting for delivery",
    )
    op.create_index("outbox_source_seq_idx", "outbox", ["source", "seq"], schema=SCHEMA)
    op.create_index("outbox_created_at_idx", "outbox", ["created_at"], schema=SCHEMA)
    op.create_table(
        "connector_state",
        sa.Column("connector", sa.Text, primary_key=True),
        sa.Column("delivered_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        _ts("last_error_at"),
        _ts("last_delivery_at"),
        schema=SCHEMA,
        comment="per connector: the outbox seq delivered so far",
    )


def downgrade() -> None:
    for table in ("connector_state", "outbox", "tombstones", "dead_letters", "conflicts",
                  "progress"):
        op.drop_table(table, schema=SCHEMA)

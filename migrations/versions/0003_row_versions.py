"""Row versions: the source commit time and office of rows the resolving path wrote.

A target transaction may hold several source transactions (grouping); PostgreSQL records one
commit time for it, so `pg_xact_commit_timestamp(xmin)` would date every row it wrote by the
group's last source commit. For tables resolved on commit timestamps the applier records here,
per key, the time and office of the source change that wrote the row and the row version's
`xmin` (`xid`); a row whose `xmin` no longer matches was written since by someone else (a
local writer), and its own commit timestamp applies.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "row_versions",
        sa.Column("table_name", sa.Text, primary_key=True),
        sa.Column("key", postgresql.JSONB, primary_key=True),
        sa.Column("xid", sa.BigInteger, nullable=False,
                  comment="xmin of the row version written (its transaction or subtransaction)"),
        sa.Column("commit_ts", sa.TIMESTAMP(timezone=True), nullable=False,
                  comment="source commit time of the change that wrote it"),
        sa.Column("origin", sa.Text, nullable=False, comment="the office that wrote it"),
        schema="cdc_sync",
        comment="per key: source commit time and office of the row the resolving path wrote",
    )


def downgrade() -> None:
    op.drop_table("row_versions", schema="cdc_sync")

"""Sources: every office whose replicator applies into this site.

Commit-time last-writer-wins needs `cdc_sync.row_versions` only where two offices' writes can
meet: a site that only one office replicates into compares that office's changes with rows it
wrote itself (its stream is ordered) or with local writes (dated by their own commit). The
resolving path writes row versions only while another source is registered here; a source
registers (under an exclusive advisory lock that every resolving target transaction holds
shared while it reads this table) before its slot exists, so no change of a new source can
meet a row written without its version. Filled from `cdc_sync.progress` for sites set up
before this revision.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sources",
        sa.Column("source", sa.Text, primary_key=True),
        sa.Column("registered_at", sa.TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema="cdc_sync",
        comment="every source whose replicator applies into this site (cdc-sync init and run "
                "register it)",
    )
    op.execute("INSERT INTO cdc_sync.sources (source) SELECT source FROM cdc_sync.progress")


def downgrade() -> None:
    op.drop_table("sources", schema="cdc_sync")

"""Tombstones for deletes made directly at a site (not by cdc-sync).

`cdc_sync.record_tombstone()` is an AFTER DELETE row trigger function that `cdc-sync init`
attaches to replicated tables whose conflict policy compares versions. It records the deleted
key (text values, as the applier writes them) with the time of the delete and the deleted
row's version column, so a concurrent older update arriving from another office does not
resurrect the row. Ordinary triggers do not fire in sessions with
`session_replication_role = replica`, which is how cdc-sync applies: only local deletes are
recorded here; the applier records its own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION cdc_sync.record_tombstone() RETURNS trigger
        LANGUAGE plpgsql AS $fn$
        DECLARE
            row_json jsonb := to_jsonb(OLD);
            key_json jsonb;
            version_text text;
        BEGIN
            -- TG_ARGV[0]: key column names as a text[] literal; TG_ARGV[1]: version column or ''
            SELECT jsonb_object_agg(k, row_json ->> k) INTO key_json
            FROM unnest(TG_ARGV[0]::text[]) AS k;
            IF TG_NARGS > 1 AND TG_ARGV[1] <> '' THEN
                EXECUTE format('SELECT ($1).%I::text', TG_ARGV[1]) INTO version_text USING OLD;
            END IF;
            INSERT INTO cdc_sync.tombstones (table_name, key, deleted_at, version, source)
            VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, key_json, clock_timestamp(),
                    version_text, NULL)
            ON CONFLICT (table_name, key) DO UPDATE
                SET deleted_at = EXCLUDED.deleted_at, version = EXCLUDED.version,
                    source = NULL, lsn = NULL;
            RETURN OLD;
        END
        $fn$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS cdc_sync.record_tombstone() CASCADE")

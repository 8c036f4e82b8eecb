"""Per-column merge (`merge_columns = true`): who wrote each column of a row, and when.

`cdc_sync.column_versions` holds, per key of a table merged column by column, a JSON object
column -> clock. The applier writes `{"t": commit time, "o": office}` for the columns it sets;
`cdc_sync.record_column_versions()`, an AFTER INSERT OR UPDATE row trigger that `cdc-sync
init` attaches to such tables, records local writes as `{"x": xid, "t": clock_timestamp()}`
for the columns they changed (an insert: every column), and the applier dates them by
`pg_xact_commit_timestamp` of that transaction: exactly the commit time the other offices
read in the stream. Ordinary triggers do not fire under `session_replication_role = replica`
(how cdc-sync applies), so only local writes are recorded by the trigger.

`cdc_sync.tombstones.row_values` keeps a deleted row's text values (the cells a later write to
one column brings back); `record_tombstone()` fills it for local deletes when its third
argument is 'values'.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "column_versions",
        sa.Column("table_name", sa.Text, primary_key=True),
        sa.Column("key", postgresql.JSONB, primary_key=True),
        sa.Column("clocks", postgresql.JSONB, nullable=False,
                  comment='column -> {"t": commit time, "o": office} or {"x": local xid}'),
        schema="cdc_sync",
        comment="per key of a merge_columns table: the last writer of each column",
    )
    op.add_column("tombstones", sa.Column("row_values", postgresql.JSONB, nullable=True,
                                          comment="merge_columns: the deleted row's values"),
                  schema="cdc_sync")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION cdc_sync.record_tombstone() RETURNS trigger
        LANGUAGE plpgsql AS $fn$
        DECLARE
            row_json jsonb := to_jsonb(OLD);
            key_json jsonb;
            version_text text;
            values_json jsonb;
            col text;
            val text;
        BEGIN
            -- TG_ARGV[0]: key column names as a text[] literal; TG_ARGV[1]: version column or
            -- ''; TG_ARGV[2] (optional): 'values' to keep the deleted row's text values
            SELECT jsonb_object_agg(k, row_json ->> k) INTO key_json
            FROM unnest(TG_ARGV[0]::text[]) AS k;
            IF TG_NARGS > 1 AND TG_ARGV[1] <> '' THEN
                EXECUTE format('SELECT ($1).%I::text', TG_ARGV[1]) INTO version_text USING OLD;
            END IF;
            IF TG_NARGS > 2 AND TG_ARGV[2] = 'values' THEN
                values_json := '{}'::jsonb;
                FOR col IN SELECT attname FROM pg_attribute
                           WHERE attrelid = TG_RELID AND attnum > 0 AND NOT attisdropped LOOP
                    EXECUTE format('SELECT ($1).%I::text', col) INTO val USING OLD;
                    values_json := values_json || jsonb_build_object(col, val);
                END LOOP;
            END IF;
            INSERT INTO cdc_sync.tombstones (table_name, key, deleted_at, version, source,
                                             row_values)
            VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, key_json, clock_timestamp(),
                    version_text, NULL, values_json)
            ON CONFLICT (table_name, key) DO UPDATE
                SET deleted_at = EXCLUDED.deleted_at, version = EXCLUDED.version,
                    source = NULL, lsn = NULL, row_values = EXCLUDED.row_values;
            RETURN OLD;
        END
        $fn$
        """
    )
    op.execute(
        """
        CREATE OR REPLACE FUNCTION cdc_sync.record_column_versions() RETURNS trigger
        LANGUAGE plpgsql AS $fn$
        DECLARE
            new_json jsonb := to_jsonb(NEW);
            old_json jsonb;
            key_json jsonb;
            stamp jsonb := jsonb_build_object('x', pg_current_xact_id()::text,
                                              't', clock_timestamp());
            changed jsonb;
        BEGIN
            -- TG_ARGV[0]: key column names as a text[] literal
            SELECT jsonb_object_agg(k, new_json ->> k) INTO key_json
            FROM unnest(TG_ARGV[0]::text[]) AS k;
            IF TG_OP = 'UPDATE' THEN
                old_json := to_jsonb(OLD);
                SELECT jsonb_object_agg(e.key, stamp) INTO changed FROM jsonb_each(new_json) e
                WHERE e.value IS DISTINCT FROM old_json -> e.key;
            ELSE
                SELECT jsonb_object_agg(e.key, stamp) INTO changed FROM jsonb_each(new_json) e;
            END IF;
            IF changed IS NOT NULL THEN
                INSERT INTO cdc_sync.column_versions (table_name, key, clocks)
                VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, key_json, changed)
                ON CONFLICT (table_name, key) DO UPDATE
                    SET clocks = cdc_sync.column_versions.clocks || EXCLUDED.clocks;
            END IF;
            RETURN NULL;
        END
        $fn$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS cdc_sync.record_column_versions() CASCADE")
    # record_tombstone() as revision 0002 made it (without row_values), before the column goes
    op.execute(_TOMBSTONE_0002)
    op.drop_column("tombstones", "row_values", schema="cdc_sync")
    op.drop_table("column_versions", schema="cdc_sync")


_TOMBSTONE_0002 = """
CREATE OR REPLACE FUNCTION cdc_sync.record_tombstone() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    row_json jsonb := to_jsonb(OLD);
    key_json jsonb;
    version_text text;
BEGIN
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

BEGIN;

CREATE SCHEMA IF NOT EXISTS cdc_sync;

CREATE TABLE cdc_sync.alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE cdc_sync.progress (
    source TEXT NOT NULL, 
    applied_lsn pg_lsn NOT NULL, 
    commit_ts TIMESTAMP WITH TIME ZONE, 
    snapshot_lsn pg_lsn, 
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    PRIMARY KEY (source)
);

COMMENT ON TABLE cdc_sync.progress IS 'per source: what this site has applied; written with the rows it covers';

COMMENT ON COLUMN cdc_sync.progress.applied_lsn IS 'end LSN of the last source transaction this site holds';

COMMENT ON COLUMN cdc_sync.progress.commit_ts IS 'source commit time of that transaction';

COMMENT ON COLUMN cdc_sync.progress.snapshot_lsn IS 'set once the initial copy is made: its consistent point';

CREATE TABLE cdc_sync.conflicts (
    id BIGSERIAL NOT NULL, 
    source TEXT NOT NULL, 
    table_name TEXT NOT NULL, 
    kind TEXT, 
    key JSONB, 
    local_row JSONB, 
    incoming_row JSONB, 
    strategy TEXT, 
    outcome TEXT, 
    lsn pg_lsn, 
    commit_ts TIMESTAMP WITH TIME ZONE, 
    detected_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    PRIMARY KEY (id)
);

COMMENT ON TABLE cdc_sync.conflicts IS 'conflicts the resolver met and what it did';

CREATE INDEX conflicts_detected_at_idx ON cdc_sync.conflicts (detected_at);

CREATE TABLE cdc_sync.dead_letters (
    id BIGSERIAL NOT NULL, 
    source TEXT NOT NULL, 
    table_name TEXT, 
    op TEXT, 
    key JSONB, 
    row_data JSONB, 
    old_row JSONB, 
    lsn pg_lsn, 
    commit_ts TIMESTAMP WITH TIME ZONE, 
    error TEXT, 
    sqlstate TEXT, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    retried_at TIMESTAMP WITH TIME ZONE, 
    resolved BOOLEAN DEFAULT false NOT NULL, 
    PRIMARY KEY (id)
);

COMMENT ON TABLE cdc_sync.dead_letters IS 'changes this site rejected; retried by `cdc-sync dead-letters retry`';

CREATE TABLE cdc_sync.tombstones (
    table_name TEXT NOT NULL, 
    key JSONB NOT NULL, 
    deleted_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    version TEXT, 
    source TEXT, 
    lsn pg_lsn, 
    PRIMARY KEY (table_name, key)
);

COMMENT ON TABLE cdc_sync.tombstones IS 'recently deleted keys, so a late update does not resurrect a row';

COMMENT ON COLUMN cdc_sync.tombstones.version IS 'the deleted row''s version column value, if any';

CREATE TABLE cdc_sync.outbox (
    id TEXT NOT NULL, 
    seq bigserial NOT NULL, 
    source TEXT NOT NULL, 
    topic TEXT NOT NULL, 
    event JSONB NOT NULL, 
    commit_ts TIMESTAMP WITH TIME ZONE, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    PRIMARY KEY (id), 
    UNIQUE (seq)
);

COMMENT ON TABLE cdc_sync.outbox IS 'the outbound connector table: events waiting for delivery';

COMMENT ON COLUMN cdc_sync.outbox.id IS 'the event id';

CREATE INDEX outbox_source_seq_idx ON cdc_sync.outbox (source, seq);

CREATE INDEX outbox_created_at_idx ON cdc_sync.outbox (created_at);

CREATE TABLE cdc_sync.connector_state (
    connector TEXT NOT NULL, 
    delivered_seq BIGINT DEFAULT 0 NOT NULL, 
    last_error TEXT, 
    last_error_at TIMESTAMP WITH TIME ZONE, 
    last_delivery_at TIMESTAMP WITH TIME ZONE, 
    PRIMARY KEY (connector)
);

COMMENT ON TABLE cdc_sync.connector_state IS 'per connector: the outbox seq delivered so far';

INSERT INTO cdc_sync.alembic_version (version_num) VALUES ('0001') RETURNING cdc_sync.alembic_version.version_num;

-- Running upgrade 0001 -> 0002

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
        $fn$;

UPDATE cdc_sync.alembic_version SET version_num='0002' WHERE cdc_sync.alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

CREATE TABLE cdc_sync.row_versions (
    table_name TEXT NOT NULL, 
    key JSONB NOT NULL, 
    xid BIGINT NOT NULL, 
    commit_ts TIMESTAMP WITH TIME ZONE NOT NULL, 
    origin TEXT NOT NULL, 
    PRIMARY KEY (table_name, key)
);

COMMENT ON TABLE cdc_sync.row_versions IS 'per key: source commit time and office of the row the resolving path wrote';

COMMENT ON COLUMN cdc_sync.row_versions.xid IS 'xmin of the row version written (its transaction or subtransaction)';

COMMENT ON COLUMN cdc_sync.row_versions.commit_ts IS 'source commit time of the change that wrote it';

COMMENT ON COLUMN cdc_sync.row_versions.origin IS 'the office that wrote it';

UPDATE cdc_sync.alembic_version SET version_num='0003' WHERE cdc_sync.alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

CREATE TABLE cdc_sync.column_versions (
    table_name TEXT NOT NULL, 
    key JSONB NOT NULL, 
    clocks JSONB NOT NULL, 
    PRIMARY KEY (table_name, key)
);

COMMENT ON TABLE cdc_sync.column_versions IS 'per key of a merge_columns table: the last writer of each column';

COMMENT ON COLUMN cdc_sync.column_versions.clocks IS 'column -> {"t": commit time, "o": office} or {"x": local xid}';

ALTER TABLE cdc_sync.tombstones ADD COLUMN row_values JSONB;

COMMENT ON COLUMN cdc_sync.tombstones.row_values IS 'merge_columns: the deleted row''s values';

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
        $fn$;

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
        $fn$;

UPDATE cdc_sync.alembic_version SET version_num='0004' WHERE cdc_sync.alembic_version.version_num = '0003';

-- Running upgrade 0004 -> 0005

CREATE TABLE cdc_sync.sources (
    source TEXT NOT NULL, 
    registered_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    PRIMARY KEY (source)
);

COMMENT ON TABLE cdc_sync.sources IS 'every source whose replicator applies into this site (cdc-sync init and run register it)';

INSERT INTO cdc_sync.sources (source) SELECT source FROM cdc_sync.progress;

UPDATE cdc_sync.alembic_version SET version_num='0005' WHERE cdc_sync.alembic_version.version_num = '0004';

COMMIT;


-- Migration 1 (PostgreSQL): the ledger's three tables, a port of
-- sqlite_0001_initial.sql column for column, so that status, export and the
-- row decoding are the same for both backends. Only the events' sequence
-- column differs (an identity column instead of SQLite's rowid alias).
-- JSON stays TEXT (not jsonb): the bytes written are the bytes read back.

CREATE TABLE ledger_rows (
    row_id            TEXT PRIMARY KEY,
    line              INTEGER NOT NULL,
    kind              TEXT NOT NULL,
    stage             TEXT NOT NULL,
    idempotency_key   TEXT,
    model_key         TEXT NOT NULL,
    api_project_id    TEXT,
    generation_id     TEXT,
    api_status        TEXT,
    sampling          TEXT NOT NULL DEFAULT '{}',
    params            TEXT NOT NULL DEFAULT '{}',
    source_path       TEXT,
    source_sha256     TEXT,
    source_size       BIGINT,
    output_rel        TEXT,
    output_path       TEXT,
    output_sha256     TEXT,
    output_size       BIGINT,
    upload_url        TEXT,
    upload_method     TEXT,
    upload_expires_at TEXT,
    content_type      TEXT,
    error             TEXT,
    error_code        TEXT,
    error_message     TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    polls             INTEGER NOT NULL DEFAULT 0,
    retry_count       INTEGER NOT NULL DEFAULT 0,
    base_key          TEXT,
    explicit_key      BOOLEAN NOT NULL DEFAULT FALSE,
    request_digest    TEXT NOT NULL DEFAULT '',
    group_key         TEXT,
    leader_row_id     TEXT,
    retired           BOOLEAN NOT NULL DEFAULT FALSE,
    seen_run          TEXT,
    created_at        DOUBLE PRECISION NOT NULL,
    updated_at        DOUBLE PRECISION NOT NULL
);

CREATE INDEX ledger_rows_line ON ledger_rows (line, row_id);
CREATE INDEX ledger_rows_stage ON ledger_rows (stage);
CREATE INDEX ledger_rows_group ON ledger_rows (group_key, line);
CREATE INDEX ledger_rows_key ON ledger_rows (idempotency_key);

CREATE TABLE ledger_events (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    row_id     TEXT NOT NULL,
    at         DOUBLE PRECISION NOT NULL,
    from_stage TEXT,
    to_stage   TEXT NOT NULL,
    event      TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '{}',
    run_id     TEXT NOT NULL DEFAULT ''
);

CREATE INDEX ledger_events_row ON ledger_events (row_id, seq);

CREATE TABLE ledger_runs (
    run_id     TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    host       TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    ended_at   DOUBLE PRECISION,
    exit_code  INTEGER,
    command    TEXT NOT NULL DEFAULT ''
);

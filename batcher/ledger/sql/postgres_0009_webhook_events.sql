-- Migration 9 (PostgreSQL): the API's generation events (webhooks), kept durably.
-- One row per delivery the receiver acknowledged with news or a stale fact:
-- the message id is unique, so a delivery recorded once is a duplicate
-- forever, on every host sharing the ledger. Runs read new events in seq
-- order and move their rows as a poll answer would. ledger_webhook_counts
-- keeps the receivers' counters (received, refused by reason, polls saved)
-- for batcher status.

CREATE TABLE ledger_webhook_events (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    TEXT NOT NULL UNIQUE,
    generation_id TEXT NOT NULL,
    status        TEXT NOT NULL,
    disposition   TEXT NOT NULL,
    received_at   DOUBLE PRECISION NOT NULL,
    payload       TEXT NOT NULL
);
CREATE INDEX ledger_webhook_events_generation ON ledger_webhook_events (generation_id, seq);
CREATE INDEX ledger_rows_generation ON ledger_rows (generation_id);

CREATE TABLE ledger_webhook_counts (
    name  TEXT PRIMARY KEY,
    count BIGINT NOT NULL DEFAULT 0
);

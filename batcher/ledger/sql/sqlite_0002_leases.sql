-- Migration 2 (SQLite): leases and worker heartbeats, as in
-- postgres_0002_leases.sql. No longer used: one SQLite run holds the file
-- lock, so nobody competes for its rows and the SQLite ledger has no leases.
-- Kept so that ledgers at every version migrate the same way; the tables
-- and columns stay, empty.

ALTER TABLE ledger_rows ADD COLUMN lease_owner TEXT;
ALTER TABLE ledger_rows ADD COLUMN lease_expires DOUBLE PRECISION;

-- Spelt exactly as the lease query spells its WHERE (SQLite uses a partial
-- index only when the query repeats its terms).
CREATE INDEX ledger_rows_leasable ON ledger_rows (line, row_id)
WHERE NOT retired AND leader_row_id IS NULL
  AND stage IN ('generated', 'pending', 'project', 'submitted', 'uploaded');
CREATE INDEX ledger_rows_lease_owner ON ledger_rows (lease_owner)
WHERE lease_owner IS NOT NULL;

CREATE TABLE ledger_workers (
    worker_id    TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    run_id       TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    ttl          DOUBLE PRECISION NOT NULL
);

-- Migration 2 (PostgreSQL): leases, worker heartbeats, and import sightings
-- that several hosts can share. sqlite_0002_leases.sql adds the same lease
-- columns and workers table; seen_seq exists only here (see below).

-- The worker holding the row, and until when (unix seconds; since migration 3
-- on the database's clock, ledger_now(), whatever the hosts' clocks say).
ALTER TABLE ledger_rows ADD COLUMN lease_owner TEXT;
ALTER TABLE ledger_rows ADD COLUMN lease_expires DOUBLE PRECISION;

-- Which imports saw a row: every run takes a number from ledger_import_epoch
-- when it opens, and its imports raise seen_seq to at least that number.
-- finish_import retires only rows below its own run's number, i.e. rows no
-- run that opened since has seen, so hosts importing the same manifest at
-- once never retire each other's rows (seen_run, last writer wins, could).
ALTER TABLE ledger_rows ADD COLUMN seen_seq BIGINT;
CREATE SEQUENCE ledger_import_epoch;

-- What lease() scans: active, unretired leaders in manifest order. The stage
-- list is spelt exactly as the lease query spells it, so the planner can
-- prove the query implies the predicate.
CREATE INDEX ledger_rows_leasable ON ledger_rows (line, row_id)
WHERE NOT retired AND leader_row_id IS NULL
  AND stage IN ('generated', 'pending', 'project', 'submitted', 'uploaded');
CREATE INDEX ledger_rows_lease_owner ON ledger_rows (lease_owner)
WHERE lease_owner IS NOT NULL;

-- One row per registered worker. Live while heartbeat_at + ttl >= now.
CREATE TABLE ledger_workers (
    worker_id    TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    run_id       TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    ttl          DOUBLE PRECISION NOT NULL
);

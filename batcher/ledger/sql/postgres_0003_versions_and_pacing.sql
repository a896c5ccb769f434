-- Migration 3 (PostgreSQL): row versions (as sqlite_0003_row_versions.sql),
-- the database clock that leases are judged by, and the shared pace.

-- Row versions: every write of a row's content raises its version by one; a transition
-- given the caller's copy of the row updates it only while the version is
-- still the copy's. Two hosts that both hold a row (a paused host whose
-- lease was taken over) can no longer overwrite each other's project or
-- generation id with a same-stage move. Rows of older ledgers start at 0.

ALTER TABLE ledger_rows ADD COLUMN version INTEGER NOT NULL DEFAULT 0;

-- The database's clock, in unix seconds. Leases, heartbeats and the shared
-- pace of requests are judged by this clock alone, never by a host's own:
-- a host whose clock is off, or that was paused, cannot make a lease look
-- fresh or stale. Every statement that needs the time calls it once.
CREATE OR REPLACE FUNCTION ledger_now() RETURNS double precision
LANGUAGE sql VOLATILE
AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;

-- The shared pace of the job's requests: one row, locked by every claim, so
-- hosts draw their send times from one schedule on the database's clock
-- (see the pace_claim statement). next_at is the earliest free slot; the
-- rate columns carry the 429 back-off (AIMD) to every host.
CREATE TABLE ledger_pace (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    next_at      DOUBLE PRECISION NOT NULL DEFAULT 0,
    max_rate     DOUBLE PRECISION,
    rate         DOUBLE PRECISION,
    rate_at      DOUBLE PRECISION NOT NULL DEFAULT 0,
    paused_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_cut     DOUBLE PRECISION NOT NULL DEFAULT 0
);
INSERT INTO ledger_pace (id) VALUES (1);

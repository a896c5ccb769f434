-- Migration 3 (SQLite): a version number per row.
-- Every write of a row's content raises it by one (transitions, an import
-- that fails a row or restarts it; not the bookkeeping of which import saw
-- the row). A transition given the caller's copy of the row updates it only
-- while the version is still the copy's, so a same-stage move from a stale
-- copy conflicts instead of overwriting what another writer stored.
-- Rows of older ledgers start at 0.

ALTER TABLE ledger_rows ADD COLUMN version INTEGER NOT NULL DEFAULT 0;

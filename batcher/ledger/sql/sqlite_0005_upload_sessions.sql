-- Migration 5 (SQLite): resumable uploads in parts, and queue positions.
-- A file row's upload session (the current API's: upload host, token, part
-- size, expiry, as a JSON object) and the multipart upload started in it are
-- kept with the project, and every part the upload host confirmed is kept in
-- ledger_upload_parts, so a killed run goes on from the next part while the
-- session is valid. queue_position is the fleet queue position the last
-- progress answer gave for a submitted generation (batcher status shows it).

ALTER TABLE ledger_rows ADD COLUMN upload_session TEXT;
ALTER TABLE ledger_rows ADD COLUMN upload_id TEXT;
ALTER TABLE ledger_rows ADD COLUMN queue_position INTEGER;

-- One row per confirmed part of one upload: its etag (for the completion)
-- and the size and sha256 of the bytes sent (so a part changed on disk
-- since it was sent is caught before the upload is completed).
CREATE TABLE ledger_upload_parts (
    row_id      TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    etag        TEXT NOT NULL,
    size        BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    at          DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (row_id, upload_id, part_number)
);

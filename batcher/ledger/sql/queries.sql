-- The ledger's statements, one per "-- name:" block.
-- Parameters are named (:row_id); a PostgreSQL port rewrites them to $n.
-- Stage lists are bound as seven parameters :s0..:s6 (padded by repeating a
-- stage), so a statement's text does not depend on how many stages it names.

-- name: get_row
SELECT * FROM ledger_rows WHERE row_id = :row_id;

-- name: get_stage
SELECT stage, version FROM ledger_rows WHERE row_id = :row_id;

-- name: insert_row
INSERT INTO ledger_rows (
    row_id, line, kind, stage, idempotency_key, model_key, api_project_id,
    sampling, params, source_path, source_sha256, source_size, output_rel,
    error, error_code, error_message, explicit_key, request_digest, group_key,
    leader_row_id, retired, seen_run, created_at, updated_at
) VALUES (
    :row_id, :line, :kind, :stage, :idempotency_key, :model_key, :api_project_id,
    :sampling, :params, :source_path, :source_sha256, :source_size, :output_rel,
    :error, :error_code, :error_message, :explicit_key, :request_digest, :group_key,
    :leader_row_id, FALSE, :run_id, :now, :now
)
ON CONFLICT (row_id) DO NOTHING;

-- name: find_leader
-- The row an imported row follows (rules.first_earlier): a leading row of its
-- group that holds the request (rules.HOLDING_STAGES), whatever its line or
-- run; else the group's first row above it in the manifest being imported
-- now (the runner re-points a follower of a follower once the import ends).
SELECT row_id FROM ledger_rows
WHERE group_key = :group_key AND NOT retired AND row_id <> :row_id
  AND (((leader_row_id IS NULL
         AND (stage NOT IN ('pending', 'failed') OR generation_id IS NOT NULL))
        OR stage = 'complete')
       OR (seen_run = :run_id AND line < :line))
ORDER BY ((leader_row_id IS NULL
           AND (stage NOT IN ('pending', 'failed') OR generation_id IS NOT NULL))
          OR stage = 'complete') DESC,
         line, row_id
LIMIT 1;

-- name: group_rows
-- The rows of one logical request still in the job, by line.
SELECT * FROM ledger_rows WHERE group_key = :group_key AND NOT retired
ORDER BY line, row_id;

-- name: mark_seen
UPDATE ledger_rows SET line = :line, seen_run = :run_id, retired = FALSE
WHERE row_id = :row_id
RETURNING *;

-- name: mark_invalid
-- Only rows that never reached the API (pending) or have already failed.
UPDATE ledger_rows
SET stage = 'failed', error = :error, error_code = :error_code,
    error_message = :error_message, updated_at = :now, version = version + 1
WHERE row_id = :row_id AND stage IN ('pending', 'failed')
RETURNING *;

-- name: revalidate_row
-- A row imported as invalid that is valid now: it never reached the API, so
-- its request content is replaced and it starts again from pending.
UPDATE ledger_rows
SET kind = :kind, stage = 'pending', idempotency_key = :idempotency_key,
    model_key = :model_key,
    api_project_id = :api_project_id, sampling = :sampling, params = :params,
    source_path = :source_path, source_sha256 = :source_sha256,
    source_size = :source_size, output_rel = :output_rel, error = NULL,
    error_code = NULL, error_message = NULL, explicit_key = :explicit_key,
    request_digest = :request_digest, group_key = :group_key,
    leader_row_id = :leader_row_id, updated_at = :now, version = version + 1
WHERE row_id = :row_id AND stage = 'failed' AND error_code = 'invalidRow'
  AND generation_id IS NULL
RETURNING *;

-- name: transition
-- The compare-and-set: the stage and, when the caller passed its copy of the
-- row, the version it read (:version NULL otherwise). {assignments} becomes
-- ", <column> = :<column>" for each column the update names; the names come
-- from model.UPDATE_COLUMNS only. {returning} is * or, when the caller holds
-- the row, only the columns the database computes (decoding the whole row
-- was most of a transition's CPU).
UPDATE ledger_rows SET
    stage = :to_stage,
    updated_at = :now,
    attempts = attempts + :attempts_delta,
    polls = polls + :polls_delta,
    version = version + 1{assignments}
WHERE row_id = :row_id AND stage IN (:s0, :s1, :s2, :s3, :s4, :s5, :s6)
  AND (:version IS NULL OR version = :version)
RETURNING {returning};

-- name: insert_event
INSERT INTO ledger_events (row_id, at, from_stage, to_stage, event, detail, run_id)
VALUES (:row_id, :at, :from_stage, :to_stage, :event, :detail, :run_id);

-- name: retire_unseen
UPDATE ledger_rows SET retired = TRUE
WHERE NOT retired AND (seen_run IS NULL OR seen_run <> :run_id);

-- name: rows_page
-- Keyset paging: one page after (:after_line, :after_row_id). The stage test
-- is on an expression on purpose: it keeps the planner off the stage index,
-- which would sort every matching row for each page (quadratic in a long
-- listing); walking the (line, row_id) index and filtering is linear.
SELECT * FROM ledger_rows
WHERE (line, row_id) > (:after_line, :after_row_id)
  AND (stage || '') IN (:s0, :s1, :s2, :s3, :s4, :s5, :s6)
  AND (:include_retired OR NOT retired)
ORDER BY line, row_id
LIMIT :limit;

-- name: counts
SELECT stage, COUNT(*) FROM ledger_rows
WHERE :include_retired OR NOT retired
GROUP BY stage;

-- name: error_summary
-- By code, one message as the example: messages name their row or generation,
-- so grouping by message would list every failure on its own.
SELECT COALESCE(error_code, ''), MIN(COALESCE(error_message, '')), COUNT(*) AS n
FROM ledger_rows
WHERE stage = 'failed' AND NOT retired
GROUP BY COALESCE(error_code, '')
ORDER BY n DESC, 1, 2
LIMIT :limit;

-- name: events
SELECT row_id, at, from_stage, to_stage, event, detail, run_id
FROM ledger_events WHERE row_id = :row_id ORDER BY seq;

-- name: insert_run
INSERT INTO ledger_runs (run_id, pid, host, started_at, command)
VALUES (:run_id, :pid, :host, :started_at, :command)
ON CONFLICT (run_id) DO NOTHING;

-- name: end_run
UPDATE ledger_runs SET ended_at = :ended_at, exit_code = :exit_code
WHERE run_id = :run_id;

-- name: runs
SELECT run_id, pid, host, started_at, ended_at, exit_code, command
FROM ledger_runs ORDER BY started_at, run_id;

-- name: record_part
-- A part the upload host confirmed, kept only while the row is still
-- uploading that very upload (a stale writer records nothing). A part sent
-- again replaces the earlier record of its number.
INSERT INTO ledger_upload_parts (row_id, upload_id, part_number, etag, size, sha256, at)
SELECT :row_id, :upload_id, :part_number, :etag, :size, :sha256, :now
WHERE EXISTS (
    SELECT 1 FROM ledger_rows
    WHERE row_id = :row_id AND stage = 'project' AND upload_id = :upload_id
)
ON CONFLICT (row_id, upload_id, part_number) DO UPDATE
SET etag = excluded.etag, size = excluded.size, sha256 = excluded.sha256, at = excluded.at;

-- name: upload_parts
SELECT part_number, etag, size, sha256 FROM ledger_upload_parts
WHERE row_id = :row_id AND upload_id = :upload_id
ORDER BY part_number;

-- name: forget_parts
DELETE FROM ledger_upload_parts WHERE row_id = :row_id;

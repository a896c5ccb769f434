-- The PostgreSQL ledger's own statements, one per "-- name:" block, in the
-- format of queries.sql (whose portable statements it also uses). :named
-- parameters become $n when loaded; a name used twice is one parameter.
-- Casts (::text[]) tell PostgreSQL the types it cannot infer.
-- {active} becomes the quoted ACTIVE_STAGES, in the order the partial index
-- ledger_rows_leasable spells them.
--
-- Lock order: every statement that locks several rows of ledger_rows locks
-- them by row_id (ORDER BY row_id FOR UPDATE), so concurrent hosts queue
-- instead of deadlocking; lease() skips locked rows instead of waiting.

-- name: lock_rows
-- The batch's rows that exist already, locked in row_id order.
SELECT row_id FROM ledger_rows
WHERE row_id = ANY(:row_ids::text[])
ORDER BY row_id
FOR UPDATE;

-- name: group_leaders
-- Per group, the best leading candidate (rules.first_earlier): a row that
-- holds the request (rules.HOLDING_STAGES), in the batch or not, else the
-- first row (by line) seen by an import since this run opened, outside the
-- batch being imported.
SELECT DISTINCT ON (group_key) group_key, line, row_id, holds FROM (
    SELECT group_key, line, row_id, seen_seq,
           ((leader_row_id IS NULL
             AND (stage NOT IN ('pending', 'failed') OR generation_id IS NOT NULL))
            OR stage = 'complete') AS holds
    FROM ledger_rows
    WHERE group_key = ANY(:groups::text[]) AND NOT retired
) AS candidates
WHERE holds OR (seen_seq >= :epoch::bigint AND row_id <> ALL(:row_ids::text[]))
ORDER BY group_key, holds DESC, line, row_id;

-- name: insert_rows
-- Rows another host inserts meanwhile are skipped here and marked below.
INSERT INTO ledger_rows (
    row_id, line, kind, stage, idempotency_key, model_key, api_project_id,
    sampling, params, source_path, source_sha256, source_size, output_rel,
    error, error_code, error_message, explicit_key, request_digest, group_key,
    leader_row_id, retired, seen_run, seen_seq, created_at, updated_at
)
SELECT
    u.row_id, u.line, u.kind, u.stage, u.idempotency_key, u.model_key, u.api_project_id,
    u.sampling, u.params, u.source_path, u.source_sha256, u.source_size, u.output_rel,
    u.error, u.error_code, u.error_message, u.explicit_key, u.request_digest, u.group_key,
    u.leader_row_id, FALSE, :run_id::text, :epoch::bigint, :now::float8, :now::float8
FROM unnest(
    :row_id::text[], :line::int[], :kind::text[], :stage::text[],
    :idempotency_key::text[], :model_key::text[], :api_project_id::text[],
    :sampling::text[], :params::text[], :source_path::text[], :source_sha256::text[],
    :source_size::bigint[], :output_rel::text[], :error::text[], :error_code::text[],
    :error_message::text[], :explicit_key::boolean[], :request_digest::text[],
    :group_key::text[], :leader_row_id::text[]
) AS u (
    row_id, line, kind, stage, idempotency_key, model_key, api_project_id,
    sampling, params, source_path, source_sha256, source_size, output_rel,
    error, error_code, error_message, explicit_key, request_digest, group_key,
    leader_row_id
)
ON CONFLICT (row_id) DO NOTHING
RETURNING *;

-- name: mark_seen_rows
-- seen_seq only grows: a host that opened earlier importing after us must
-- not make our finish_import retire the row.
UPDATE ledger_rows r
SET line = u.line, seen_run = :run_id::text, retired = FALSE,
    seen_seq = GREATEST(COALESCE(r.seen_seq, 0), :epoch::bigint)
FROM unnest(:row_ids::text[], :lines::int[]) AS u (row_id, line)
WHERE r.row_id = u.row_id
RETURNING r.*;

-- name: insert_import_events
INSERT INTO ledger_events (row_id, at, from_stage, to_stage, event, detail, run_id)
SELECT u.row_id, :at::float8, NULL, u.to_stage, 'imported', u.detail, :run_id::text
FROM unnest(:row_ids::text[], :to_stages::text[], :details::text[])
    AS u (row_id, to_stage, detail);

-- name: retire_unseen
UPDATE ledger_rows SET retired = TRUE
WHERE NOT retired AND (seen_seq IS NULL OR seen_seq < :epoch::bigint);

-- name: next_epoch
SELECT nextval('ledger_import_epoch');

-- name: transition
-- The compare-and-set and its event, one statement. cur locks the row and
-- reads its stage and version as of the lock (a concurrent move has
-- committed or not), so the event names the stage this move really left.
-- :version is the version of the caller's copy of the row, or NULL when it
-- passed none. {assignments} becomes ", <column> = :<column>" for each
-- column the update names; the names come from model.UPDATE_COLUMNS only.
-- {returning} is * or, when the caller holds the row, only the columns the
-- database computes.
WITH cur AS (
    SELECT row_id, stage, version FROM ledger_rows WHERE row_id = :row_id::text FOR UPDATE
), moved AS (
    UPDATE ledger_rows r SET
        stage = :to_stage::text,
        updated_at = :now::float8,
        attempts = r.attempts + :attempts_delta::int,
        polls = r.polls + :polls_delta::int,
        version = r.version + 1{assignments}
    FROM cur
    WHERE r.row_id = cur.row_id AND cur.stage = ANY(:allowed::text[])
      AND (:version::int IS NULL OR cur.version = :version::int)
    RETURNING r.*, cur.stage AS from_stage
), logged AS (
    INSERT INTO ledger_events (row_id, at, from_stage, to_stage, event, detail, run_id)
    SELECT row_id, :now::float8, from_stage, :to_stage::text, :event::text,
           :detail::text, :run_id::text
    FROM moved
)
SELECT {returning} FROM moved;

-- name: rows_page
SELECT * FROM ledger_rows
WHERE (line, row_id) > (:after_line::int, :after_row_id::text)
  AND stage = ANY(:stages::text[])
  AND (:include_retired::boolean OR NOT retired)
ORDER BY line, row_id
LIMIT :limit::int;

-- Leases and workers. Every time here is the database's (ledger_now(), read
-- once per statement in the CTE t), never a host's.

-- name: register_worker
INSERT INTO ledger_workers (worker_id, host, pid, run_id, started_at, heartbeat_at, ttl)
SELECT :worker_id::text, :host::text, :pid::int, :run_id::text, t.now, t.now, :ttl::float8
FROM (SELECT ledger_now() AS now) AS t
ON CONFLICT (worker_id) DO UPDATE SET
    host = EXCLUDED.host, pid = EXCLUDED.pid, run_id = EXCLUDED.run_id,
    heartbeat_at = EXCLUDED.heartbeat_at, ttl = EXCLUDED.ttl;

-- name: heartbeat
-- One statement: touch the worker, renew its unexpired leases (locked by
-- row_id), and count the live workers. A lease that ran out is not revived:
-- another worker may be taking it over. The count reads the table as it was
-- before this statement, so the caller is counted by name.
WITH t AS (
    SELECT ledger_now() AS now
), touched AS (
    UPDATE ledger_workers SET heartbeat_at = t.now, ttl = :ttl::float8
    FROM t WHERE worker_id = :worker_id::text
    RETURNING worker_id
), held AS (
    SELECT row_id FROM ledger_rows, t
    WHERE lease_owner = :worker_id::text AND lease_expires >= t.now
      AND EXISTS (SELECT 1 FROM touched)
    ORDER BY row_id
    FOR UPDATE OF ledger_rows
), renewed AS (
    UPDATE ledger_rows r SET lease_expires = t.now + :ttl::float8
    FROM held, t
    WHERE r.row_id = held.row_id AND r.lease_owner = :worker_id::text
      AND r.lease_expires >= t.now
    RETURNING r.row_id
)
SELECT
    (SELECT COUNT(*) FROM touched) AS registered,
    (SELECT COUNT(*) FROM renewed) AS renewed,
    (SELECT COUNT(*) FROM ledger_workers, t
     WHERE heartbeat_at + ttl >= t.now
        OR worker_id IN (SELECT worker_id FROM touched)) AS live;

-- name: hold
-- The worker's lease on one row, renewed if it is still the worker's and
-- unexpired; no row returned otherwise. The UPDATE locks the row, so a
-- concurrent lease() either took it first (the owner differs now) or skips it.
WITH t AS (SELECT ledger_now() AS now)
UPDATE ledger_rows r SET lease_expires = t.now + :ttl::float8
FROM t
WHERE r.row_id = :row_id::text AND r.lease_owner = :worker_id::text
  AND r.lease_expires >= t.now
RETURNING r.row_id;

-- name: worker_known
SELECT 1 FROM ledger_workers WHERE worker_id = :worker_id::text;

-- name: lease
-- SKIP LOCKED: rows another host is leasing (or a transaction holds) are
-- passed over, so concurrent callers get disjoint rows without waiting.
-- FOR UPDATE re-checks the WHERE on the newest version of each row, so a
-- row leased by someone else since this statement began is not taken.
WITH t AS (
    SELECT ledger_now() AS now
), picked AS (
    SELECT row_id, lease_owner AS previous_owner, lease_expires AS previous_expires
    FROM ledger_rows
    WHERE NOT retired AND leader_row_id IS NULL
      AND stage IN ({active})
      AND (lease_owner IS NULL OR lease_expires < (SELECT now FROM t))
    ORDER BY line, row_id
    LIMIT :limit::int
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE ledger_rows r
    SET lease_owner = :worker_id::text, lease_expires = t.now + :ttl::float8
    FROM picked, t WHERE r.row_id = picked.row_id
    RETURNING r.*, picked.previous_owner, picked.previous_expires, t.now AS leased_at
), taken_over AS (
    INSERT INTO ledger_events (row_id, at, from_stage, to_stage, event, detail, run_id)
    SELECT row_id, leased_at, stage, stage, :event::text,
           json_build_object(
               'previousOwner', previous_owner,
               'leaseExpiredAt', previous_expires,
               'owner', :worker_id::text
           )::text,
           :run_id::text
    FROM leased
    WHERE previous_owner IS NOT NULL AND previous_owner <> :worker_id::text
)
SELECT * FROM leased ORDER BY line, row_id;

-- name: release
WITH held AS (
    SELECT row_id FROM ledger_rows
    WHERE row_id = ANY(:row_ids::text[]) AND lease_owner = :worker_id::text
    ORDER BY row_id
    FOR UPDATE
)
UPDATE ledger_rows r SET lease_owner = NULL, lease_expires = NULL
FROM held WHERE r.row_id = held.row_id AND r.lease_owner = :worker_id::text;

-- name: release_all
WITH held AS (
    SELECT row_id FROM ledger_rows
    WHERE lease_owner = :worker_id::text
    ORDER BY row_id
    FOR UPDATE
)
UPDATE ledger_rows r SET lease_owner = NULL, lease_expires = NULL
FROM held WHERE r.row_id = held.row_id AND r.lease_owner = :worker_id::text;

-- name: forget_worker
DELETE FROM ledger_workers WHERE worker_id = :worker_id::text;

-- name: live_workers
WITH t AS (SELECT ledger_now() AS now)
SELECT w.worker_id, w.host, w.pid, w.run_id, w.started_at, w.heartbeat_at, w.ttl,
       (SELECT COUNT(*) FROM ledger_rows r
        WHERE r.lease_owner = w.worker_id AND r.lease_expires >= t.now) AS leases
FROM ledger_workers w, t
WHERE w.heartbeat_at + w.ttl >= t.now
ORDER BY w.started_at, w.worker_id;

-- name: pending_work
WITH t AS (SELECT ledger_now() AS now)
SELECT
    COUNT(*) FILTER (WHERE lease_owner IS NULL OR lease_expires < t.now) AS free,
    COUNT(*) FILTER (WHERE lease_owner IS NOT NULL AND lease_expires >= t.now) AS held
FROM ledger_rows, t
WHERE NOT retired AND leader_row_id IS NULL AND stage IN ({active});

-- name: pace_claim
-- One claim on the shared pace (rules.claim_slots is the same in Python, for
-- the memory ledger; both pass one contract). locked takes the row's lock
-- first, so the time is read after any wait for it. :rate (a new ceiling)
-- and :pause (a 429's pause) are NULL when the host has none to report.
WITH locked AS (
    SELECT * FROM ledger_pace WHERE id = 1 FOR UPDATE
), cur AS (
    -- grown: the rate last set, plus a twentieth of the ceiling per second
    -- since then, counted from the end of the last pause
    SELECT locked.*, t.now, COALESCE(:rate::float8, locked.max_rate) AS top,
           LEAST(locked.max_rate, locked.rate + locked.max_rate / 20
                 * GREATEST(0, t.now - GREATEST(locked.rate_at, locked.paused_until))) AS grown
    FROM locked, (SELECT ledger_now() AS now) AS t
), configured AS (
    -- a new ceiling holds at once, unless the rate is recovering from a 429
    SELECT cur.*,
           CASE WHEN grown IS NULL THEN top
                WHEN :rate::float8 IS NULL THEN grown
                WHEN grown < max_rate THEN LEAST(grown, :rate::float8)
                ELSE :rate::float8 END AS r0,
           (:pause::float8 IS NOT NULL AND now >= paused_until AND now >= last_cut + 1) AS cut
    FROM cur
), decided AS (
    SELECT configured.*,
           CASE WHEN cut THEN GREATEST(GREATEST(top / 50, LEAST(1, top)), r0 / 2)
                ELSE r0 END AS r,
           CASE WHEN :pause::float8 IS NULL THEN paused_until
                ELSE GREATEST(paused_until, now + :pause::float8) END AS until
    FROM configured
), slots AS (
    SELECT decided.*,
           (1 + :margin::float8) / CASE WHEN r < 1 THEN r ELSE floor(r + 1e-9) END AS spacing,
           GREATEST(next_at, now + :lead::float8, until) AS first_at
    FROM decided
)
UPDATE ledger_pace p SET
    next_at = s.first_at + :count::int * s.spacing,
    max_rate = s.top, rate = s.r, rate_at = s.now, paused_until = s.until,
    last_cut = CASE WHEN s.cut THEN s.now ELSE p.last_cut END
FROM slots s
WHERE p.id = 1 AND s.top IS NOT NULL
RETURNING s.first_at, s.spacing, :count::int AS count, s.now, s.r AS rate,
          s.top AS max_rate, s.until AS paused_until;

-- name: record_part
-- As in queries.sql, with the types spelt out: parameters in a SELECT list
-- would otherwise be taken as text.
INSERT INTO ledger_upload_parts (row_id, upload_id, part_number, etag, size, sha256, at)
SELECT :row_id::text, :upload_id::text, :part_number::int, :etag::text, :size::bigint,
       :sha256::text, :now::double precision
WHERE EXISTS (
    SELECT 1 FROM ledger_rows
    WHERE row_id = :row_id::text AND stage = 'project' AND upload_id = :upload_id::text
)
ON CONFLICT (row_id, upload_id, part_number) DO UPDATE
SET etag = excluded.etag, size = excluded.size, sha256 = excluded.sha256, at = excluded.at;

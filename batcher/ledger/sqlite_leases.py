"""Leases and worker heartbeats on a SQLite ledger (schema: sqlite_0002_leases.sql).

One ``batcher run`` holds a SQLite ledger's file lock, so nobody competes for
its rows; the leases exist so that the runner has one code path for every
backend, and they follow :class:`~batcher.ledger.base.LeasingLedger` exactly
(the contract suite checks them against memory and PostgreSQL). Each function
takes a connection and runs inside one job of the ledger's writer or reader,
which makes every call atomic.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from batcher.errors import LedgerError
from batcher.ledger.base import LEASE_TAKEN_OVER
from batcher.model import ACTIVE_STAGES, LedgerRow, RunInfo

__all__ = [
    "deregister_worker",
    "heartbeat",
    "lease",
    "live_workers",
    "pending_work",
    "register_worker",
    "release",
]

# Spelt as the partial index ledger_rows_leasable spells it, so SQLite can use
# it; INDEXED BY makes it (SQLite would rather take the stage index and sort
# every active row on each call) and fails loudly should the two drift apart.
_ACTIVE = ", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STAGES))
_LEASABLE = f"NOT retired AND leader_row_id IS NULL\n  AND stage IN ({_ACTIVE})"
_FREE = "(lease_owner IS NULL OR lease_expires < :now)"

_REGISTER = """
INSERT INTO ledger_workers (worker_id, host, pid, run_id, started_at, heartbeat_at, ttl)
VALUES (:worker_id, :host, :pid, :run_id, :now, :now, :ttl)
ON CONFLICT (worker_id) DO UPDATE SET
    host = excluded.host, pid = excluded.pid, run_id = excluded.run_id,
    heartbeat_at = excluded.heartbeat_at, ttl = excluded.ttl
"""
_TOUCH = "UPDATE ledger_workers SET heartbeat_at = :now, ttl = :ttl WHERE worker_id = :worker_id"
_RENEW = "UPDATE ledger_rows SET lease_expires = :now + :ttl WHERE lease_owner = :worker_id"
_LIVE_COUNT = "SELECT COUNT(*) FROM ledger_workers WHERE heartbeat_at + ttl >= :now"
_KNOWN = "SELECT 1 FROM ledger_workers WHERE worker_id = :worker_id"
_CANDIDATES = f"""
SELECT row_id, stage, lease_owner, lease_expires
FROM ledger_rows INDEXED BY ledger_rows_leasable
WHERE {_LEASABLE}
  AND {_FREE}
ORDER BY line, row_id
LIMIT :limit
"""
_TAKE = """
UPDATE ledger_rows SET lease_owner = :worker_id, lease_expires = :now + :ttl
WHERE row_id = :row_id
RETURNING *
"""
_RELEASE = """
UPDATE ledger_rows SET lease_owner = NULL, lease_expires = NULL
WHERE row_id = :row_id AND lease_owner = :worker_id
"""
_RELEASE_ALL = """
UPDATE ledger_rows SET lease_owner = NULL, lease_expires = NULL
WHERE lease_owner = :worker_id
"""
_FORGET = "DELETE FROM ledger_workers WHERE worker_id = :worker_id"
_LIVE = """
SELECT w.worker_id, w.host, w.pid, w.run_id, w.started_at, w.heartbeat_at, w.ttl,
       (SELECT COUNT(*) FROM ledger_rows r
        WHERE r.lease_owner = w.worker_id AND r.lease_expires >= :now) AS leases
FROM ledger_workers w
WHERE w.heartbeat_at + w.ttl >= :now
ORDER BY w.started_at, w.worker_id
"""
_PENDING = f"""
SELECT COALESCE(SUM({_FREE}), 0), COALESCE(SUM(NOT {_FREE}), 0)
FROM ledger_rows INDEXED BY ledger_rows_leasable
WHERE {_LEASABLE}
"""
_EVENT = """
INSERT INTO ledger_events (row_id, at, from_stage, to_stage, event, detail, run_id)
VALUES (:row_id, :at, :stage, :stage, :event, :detail, :run_id)
"""


def register_worker(
    conn: sqlite3.Connection, worker_id: str, run: RunInfo, ttl: float, now: float
) -> None:
    """Insert or refresh the worker (a re-registration keeps ``started_at``)."""
    conn.execute(
        _REGISTER,
        {
            "worker_id": worker_id,
            "host": run.host,
            "pid": run.pid,
            "run_id": run.run_id,
            "now": now,
            "ttl": float(ttl),
        },
    )


def heartbeat(conn: sqlite3.Connection, worker_id: str, ttl: float, now: float) -> int:
    """Renew the worker and its leases; the number of live workers."""
    params = {"worker_id": worker_id, "now": now, "ttl": float(ttl)}
    if conn.execute(_TOUCH, params).rowcount == 0:
        raise LedgerError(f"worker {worker_id} is not registered")
    conn.execute(_RENEW, params)
    return int(conn.execute(_LIVE_COUNT, params).fetchone()[0])


def lease(
    conn: sqlite3.Connection,
    worker_id: str,
    limit: int,
    ttl: float,
    now: float,
    run_id: str,
    to_row: Callable[[Mapping[str, Any]], LedgerRow],
) -> list[LedgerRow]:
    """Lease up to ``limit`` free rows in manifest order; ``to_row`` decodes one."""
    params: dict[str, Any] = {"worker_id": worker_id, "now": now, "ttl": float(ttl)}
    if conn.execute(_KNOWN, params).fetchone() is None:
        raise LedgerError(f"worker {worker_id} is not registered")
    if limit <= 0:
        return []
    picked = conn.execute(_CANDIDATES, {**params, "limit": limit}).fetchall()
    rows = []
    for row_id, stage, owner, expires in picked:
        cursor = conn.execute(_TAKE, {**params, "row_id": row_id})
        names = [d[0] for d in cursor.description]
        rows.append(to_row(dict(zip(names, cursor.fetchone(), strict=True))))
        if owner is not None and owner != worker_id:
            detail = {"previousOwner": owner, "leaseExpiredAt": expires, "owner": worker_id}
            conn.execute(
                _EVENT,
                {
                    "row_id": row_id,
                    "at": now,
                    "stage": stage,
                    "event": LEASE_TAKEN_OVER,
                    "detail": orjson.dumps(detail).decode(),
                    "run_id": run_id,
                },
            )
    return rows


def release(conn: sqlite3.Connection, worker_id: str, row_ids: Sequence[str]) -> None:
    """Clear the worker's leases on ``row_ids``."""
    conn.executemany(_RELEASE, [{"row_id": rid, "worker_id": worker_id} for rid in row_ids])


def deregister_worker(conn: sqlite3.Connection, worker_id: str) -> None:
    """Clear every lease of the worker and delete it."""
    conn.execute(_RELEASE_ALL, {"worker_id": worker_id})
    conn.execute(_FORGET, {"worker_id": worker_id})


def live_workers(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Live workers, oldest first, each with its count of unexpired leases."""
    cursor = conn.execute(_LIVE, {"now": now})
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def pending_work(conn: sqlite3.Connection, now: float) -> tuple[int, int]:
    """(lease candidates free now, lease candidates under an unexpired lease)."""
    free, held = conn.execute(_PENDING, {"now": now}).fetchone()
    return int(free), int(held)

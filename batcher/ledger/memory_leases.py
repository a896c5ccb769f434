"""The memory ledger's leases: workers, heartbeats, leases and the shared pace.

The :class:`~batcher.ledger.base.LeasingLedger` methods of a shared memory
ledger, made as the PostgreSQL ledger makes them; they read the store's
clock, as that ledger reads the database server's. A private memory ledger
has no leases: these raise LedgerError on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio.lowlevel

from batcher.errors import LedgerError
from batcher.ledger.base import LEASE_TAKEN_OVER, PaceClaim
from batcher.ledger.memory_store import MemoryHandle
from batcher.ledger.rules import claim_slots
from batcher.model import ACTIVE_STAGES, LedgerRow, RunInfo

__all__ = ["MemoryLeases"]


class MemoryLeases(MemoryHandle):
    """Mixed into :class:`~batcher.ledger.memory.MemoryLedger`."""

    shared: bool
    description: str

    def _hosts(self, *, write: bool) -> float:
        """Check that leases may be used now; the store's time."""
        if write:
            self._writer()
        else:
            self._reader()
        if not self.shared:
            raise LedgerError(f"{self.description} is private to one run: it has no leases")
        return self._db.clock()

    def _leasable(self, row: LedgerRow) -> bool:
        return row.stage in ACTIVE_STAGES and not row.retired and row.leader_row_id is None

    def _known_worker(self, worker_id: str) -> dict[str, Any]:
        worker = self._db.workers.get(worker_id)
        if worker is None:
            raise LedgerError(f"worker {worker_id} is not registered")
        return worker

    def _live(self, now: float) -> list[dict[str, Any]]:
        return [w for w in self._db.workers.values() if w["heartbeat_at"] + w["ttl"] >= now]

    async def register_worker(self, worker_id: str, run: RunInfo, ttl: float) -> None:
        """Record a live worker; see :class:`~batcher.ledger.base.LeasingLedger`."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        started = self._db.workers.get(worker_id, {}).get("started_at", now)
        self._db.workers[worker_id] = {
            "worker_id": worker_id,
            "host": run.host,
            "pid": run.pid,
            "run_id": run.run_id,
            "started_at": started,
            "heartbeat_at": now,
            "ttl": float(ttl),
        }

    async def heartbeat(self, worker_id: str, ttl: float) -> int:
        """Renew the worker and its leases; return the number of live workers."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        worker = self._known_worker(worker_id)
        worker.update(heartbeat_at=now, ttl=float(ttl))
        for rid, (owner, expires) in self._db.leases.items():
            if owner == worker_id and expires >= now:  # one that ran out is not revived
                self._db.leases[rid] = (owner, now + ttl)
        return len(self._live(now))

    async def lease(self, worker_id: str, limit: int, ttl: float) -> list[LedgerRow]:
        """Lease up to ``limit`` free rows in manifest order to the worker."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        self._known_worker(worker_id)
        free = sorted(
            (
                r
                for r in self._db.rows.values()
                if self._leasable(r)
                and (r.row_id not in self._db.leases or self._db.leases[r.row_id][1] < now)
            ),
            key=lambda r: (r.line, r.row_id),
        )[: max(limit, 0)]
        for row in free:
            previous = self._db.leases.get(row.row_id)
            self._db.leases[row.row_id] = (worker_id, now + ttl)
            if previous is not None and previous[0] != worker_id:
                detail = {
                    "previousOwner": previous[0],
                    "leaseExpiredAt": previous[1],
                    "owner": worker_id,
                }
                self._event(row.row_id, now, row.stage, row.stage, LEASE_TAKEN_OVER, detail)
        return free

    async def hold(self, worker_id: str, row_id: str, ttl: float) -> bool:
        """Renew the worker's unexpired lease on the row; False when it has none."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        lease = self._db.leases.get(row_id)
        if lease is None or lease[0] != worker_id or lease[1] < now:
            return False
        self._db.leases[row_id] = (worker_id, now + ttl)
        return True

    async def claim_slots(self, count: int, *, lead: float, margin: float,
                          rate: float | None = None, pause: float | None = None) -> PaceClaim:
        """Claim send slots of the shared pace; see :class:`~batcher.ledger.base.LeasingLedger`."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        self._db.pace, claim = claim_slots(
            self._db.pace, now, count=count, lead=lead, margin=margin, rate=rate, pause=pause
        )
        return claim

    async def release(self, worker_id: str, row_ids: Sequence[str]) -> None:
        """Give back the worker's leases on ``row_ids``."""
        await anyio.lowlevel.checkpoint()
        self._hosts(write=True)
        for rid in row_ids:
            held = self._db.leases.get(rid)
            if held is not None and held[0] == worker_id:
                del self._db.leases[rid]

    async def deregister_worker(self, worker_id: str) -> None:
        """Release the worker's leases and forget it."""
        await anyio.lowlevel.checkpoint()
        self._hosts(write=True)
        for rid in [rid for rid, (owner, _) in self._db.leases.items() if owner == worker_id]:
            del self._db.leases[rid]
        self._db.workers.pop(worker_id, None)

    async def live_workers(self) -> list[dict[str, Any]]:
        """Live workers, oldest first, with the number of leases each holds."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=False)
        out = []
        for w in sorted(self._live(now), key=lambda w: (w["started_at"], w["worker_id"])):
            held = sum(
                1
                for owner, exp in self._db.leases.values()
                if owner == w["worker_id"] and exp >= now
            )
            out.append({**w, "leases": held})
        return out

    async def pending_work(self) -> tuple[int, int]:
        """(rows free to lease, rows under an unexpired lease)."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=False)
        free = held = 0
        for row in self._db.rows.values():
            if not self._leasable(row):
                continue
            lease = self._db.leases.get(row.row_id)
            if lease is None or lease[1] < now:
                free += 1
            else:
                held += 1
        return free, held

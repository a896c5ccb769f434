"""The PostgreSQL ledger's leases: workers, heartbeats, leases and the shared pace.

These are the :class:`~batcher.ledger.base.LeasingLedger` methods by which
hosts split one job. Leases and heartbeats read the database server's clock
(``ledger_now()``), never a host's; ``SELECT … FOR UPDATE SKIP LOCKED``
hands each free row to one worker, and a dead worker's rows are taken over
once its leases expire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from batcher.errors import LedgerError
from batcher.ledger import codec
from batcher.ledger.base import LEASE_TAKEN_OVER, PaceClaim
from batcher.ledger.postgres_sql import PostgresPlumbing
from batcher.ledger.rules import check_claim
from batcher.model import LedgerRow, RunInfo

__all__ = ["PostgresLeases"]


class PostgresLeases(PostgresPlumbing):
    """Mixed into :class:`~batcher.ledger.postgres.PostgresLedger`."""

    async def register_worker(self, worker_id: str, run: RunInfo, ttl: float) -> None:
        """Record a live worker; see :class:`~batcher.ledger.base.LeasingLedger`."""
        params = {
            "worker_id": worker_id,
            "host": run.host,
            "pid": run.pid,
            "run_id": run.run_id,
            "ttl": float(ttl),
        }
        await self._exec("register_worker", params, f"register worker {worker_id}")

    async def heartbeat(self, worker_id: str, ttl: float) -> int:
        """Renew the worker and its leases; return the number of live workers."""
        pool = self._pool_for(write=True)
        q = self._q["heartbeat"]
        params = {"worker_id": worker_id, "ttl": float(ttl)}

        async def attempt_once() -> asyncpg.Record | None:
            return await pool.fetchrow(q.text, *q.args(params))

        found = await self._retrying(f"renew worker {worker_id}", attempt_once)
        if found is None or found["registered"] == 0:
            raise LedgerError(f"worker {worker_id} is not registered")
        return int(found["live"])

    async def lease(self, worker_id: str, limit: int, ttl: float) -> list[LedgerRow]:
        """Lease up to ``limit`` free rows in manifest order to the worker."""
        pool = self._pool_for(write=True)
        q = self._q["lease"]
        params = {
            "worker_id": worker_id,
            "limit": max(int(limit), 0),
            "ttl": float(ttl),
            "event": LEASE_TAKEN_OVER,
            "run_id": self._run_id(),
        }
        with self._translate(f"lease rows to worker {worker_id}"):
            known = await pool.fetchval(self._q["worker_known"].text, worker_id)
            if known is None:
                raise LedgerError(f"worker {worker_id} is not registered")
            if params["limit"] == 0:
                return []
            found = await pool.fetch(q.text, *q.args(params))
        return [codec.row_from_record(r) for r in found]

    async def hold(self, worker_id: str, row_id: str, ttl: float) -> bool:
        """Renew the worker's unexpired lease on the row; False when it has none."""
        pool = self._pool_for(write=True)
        q = self._q["hold"]
        params = {"worker_id": worker_id, "row_id": row_id, "ttl": float(ttl)}
        with self._translate(f"renew the lease of worker {worker_id} on row {row_id}"):
            return await pool.fetchval(q.text, *q.args(params)) is not None

    async def claim_slots(self, count: int, *, lead: float, margin: float,
                          rate: float | None = None, pause: float | None = None) -> PaceClaim:
        """Claim send slots of the shared pace in one statement (one round trip).

        See :class:`~batcher.ledger.base.LeasingLedger`. The pace is one row
        that every claim locks for the length of a single UPDATE.
        """
        pool = self._pool_for(write=True)
        check_claim(count, lead, margin, rate, pause)
        q = self._q["pace_claim"]
        params = {"count": int(count), "lead": float(lead), "margin": float(margin),
                  "rate": rate, "pause": pause}
        with self._translate("claim send slots"):
            found = await pool.fetchrow(q.text, *q.args(params))
        if found is None:
            raise LedgerError("the shared pace has no rate yet: the first claim must give one")
        return PaceClaim(**dict(found))

    async def release(self, worker_id: str, row_ids: Sequence[str]) -> None:
        """Give back the worker's leases on ``row_ids``."""
        pool = self._pool_for(write=True)
        q = self._q["release"]
        params = {"worker_id": worker_id, "row_ids": list(row_ids)}

        async def attempt_once() -> None:
            await pool.execute(q.text, *q.args(params))

        await self._retrying(f"release leases of worker {worker_id}", attempt_once)

    async def deregister_worker(self, worker_id: str) -> None:
        """Release the worker's leases and forget it, in one transaction."""
        pool = self._pool_for(write=True)
        release, forget = self._q["release_all"], self._q["forget_worker"]

        async def attempt_once() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(release.text, worker_id)
                await conn.execute(forget.text, worker_id)

        await self._retrying(f"deregister worker {worker_id}", attempt_once)

    async def live_workers(self) -> list[dict[str, Any]]:
        """Live workers, oldest first, with the number of leases each holds."""
        pool = self._pool_for(write=False)
        with self._translate("read workers"):
            found = await pool.fetch(self._q["live_workers"].text)
        return [{**dict(r), "leases": int(r["leases"])} for r in found]

    async def pending_work(self) -> tuple[int, int]:
        """(rows free to lease, rows under an unexpired lease)."""
        pool = self._pool_for(write=False)
        with self._translate("count pending work"):
            found = await pool.fetchrow(self._q["pending_work"].text)
        assert found is not None  # an aggregate always returns a row
        return int(found["free"]), int(found["held"])

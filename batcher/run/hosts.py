"""Who works on the job: this run alone, or several hosts sharing one ledger.

The ledger says which (``Ledger.shared``), once; the runner then holds one
:class:`Membership` and never asks again.

* :class:`Solo` — a private (SQLite) ledger, locked to this run: every row
  goes to work as it is imported.
* :class:`Shared` — a ledger several hosts share (PostgreSQL): this run joins
  as a worker, takes its share of ``--rate``, and works only on rows it has
  leased. A heartbeat renews its leases; a dead host's leases expire and the
  others take its rows over: rows with a generation id are polled, the others
  posted again with their key (a replay, never a second charge).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import anyio

from ..clock import Clock
from ..errors import LedgerError
from ..ledger.base import LeasingLedger, Ledger, is_shared
from ..model import LedgerRow, RunInfo
from ..ops.logs import (
    RATE_SHARE_CHANGED,
    WORKER_HEARTBEAT_FAILED,
    WORKER_JOINED,
    WORKER_LEAVE_FAILED,
    event,
)
from ..ratelimit import RateGate
from ..settings import Settings

__all__ = ["Dispatch", "Membership", "Shared", "Solo", "membership_for"]

log = logging.getLogger(__name__)

# A lease lasts --lease-ttl seconds and is renewed by a heartbeat every
# HEARTBEAT_EVERY; a new worker waits a little over one heartbeat before its
# first request, so the others have lowered their share of --rate first and
# the sum never passes it.
HEARTBEAT_EVERY = 1.0
LEASE_IDLE = 0.5
LEASE_HOLD_SECONDS = 4.0

Dispatch = Callable[[LedgerRow], Awaitable[None]]
"""Hands an imported or leased row to the stage that goes on with it."""


class Membership(Protocol):
    """How this run takes part in the job."""

    # True when other hosts may move this job's rows too: a compare-and-set
    # that loses to one of them means "done elsewhere", not a bug.
    shared: bool

    def joined(self) -> AbstractAsyncContextManager[None]:
        """Be a worker of the job while the block runs."""
        ...

    async def imported(self, row: LedgerRow, dispatch: Dispatch) -> None:
        """A row with work to do was just imported by this run."""
        ...

    async def work(self, dispatch: Dispatch) -> None:
        """After the import: take the rows this run works on, until none are left."""
        ...

    def release(self, row_id: str) -> None:
        """This run is done with the row (finished, or dropped by a halt)."""
        ...


class Solo:
    """A private ledger: this run is its only worker."""

    shared = False

    @asynccontextmanager
    async def joined(self) -> AsyncIterator[None]:
        """Nothing to join: the ledger's lock already makes the run alone."""
        yield

    async def imported(self, row: LedgerRow, dispatch: Dispatch) -> None:
        """Send the row's work at once."""
        await dispatch(row)

    async def work(self, dispatch: Dispatch) -> None:
        """Every row was sent as it was imported."""

    def release(self, row_id: str) -> None:
        """No leases to give back."""


class Shared:
    """One worker among several on a shared ledger: work is leased.

    ``stopping()`` says whether the run stopped submitting, ``stopped()``
    whether it stopped altogether (a hard halt).
    """

    shared = True

    def __init__(
        self,
        ledger: LeasingLedger,
        *,
        settings: Settings,
        gate: RateGate,
        clock: Clock,
        run_info: RunInfo,
        stopping: Callable[[], bool],
        stopped: Callable[[], bool],
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.gate = gate
        self.clock = clock
        self.run_info = run_info
        self.worker_id = f"w-{uuid.uuid4().hex[:16]}"
        self.leased: set[str] = set()
        self._stopping = stopping
        self._stopped = stopped

    @asynccontextmanager
    async def joined(self) -> AsyncIterator[None]:
        """Register, take a share of --rate, heartbeat while the block runs, leave."""
        try:
            await self._join()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                yield
                tg.cancel_scope.cancel()  # everything finished; stop the heartbeat
        finally:
            with anyio.CancelScope(shield=True):
                await self._leave()

    async def imported(self, row: LedgerRow, dispatch: Dispatch) -> None:
        """Rows are worked on only once leased (see :meth:`work`)."""

    async def work(self, dispatch: Dispatch) -> None:
        """Work only on leased rows, until no host has any left.

        Rows are leased in batches; the heartbeat renews the leases.
        """
        ttl = self.settings.lease_ttl
        while not self._stopped():
            # Hold what this host can work through in a few seconds at its
            # share of the rate: enough to keep busy, not so much that it
            # starves the other hosts or leaves much to take over if it dies.
            hold = max(2 * self.settings.concurrency, int(self.gate.rate * LEASE_HOLD_SECONDS))
            if not self._stopping() and len(self.leased) < hold:
                rows = await self.ledger.lease(self.worker_id, hold - len(self.leased), ttl)
                for row in rows:
                    self.leased.add(row.row_id)
                    await dispatch(row)
                if rows:
                    continue
            if not self.leased:
                if self._stopping():
                    return
                free, held = await self.ledger.pending_work()
                if free == 0 and held == 0:
                    return
            await self.clock.sleep(LEASE_IDLE)

    def release(self, row_id: str) -> None:
        """Forget the lease; the row's next holder, if any, is whoever leases it."""
        self.leased.discard(row_id)

    async def _join(self) -> None:
        ttl = self.settings.lease_ttl
        await self.ledger.register_worker(self.worker_id, self.run_info, ttl)
        live = await self.ledger.heartbeat(self.worker_id, ttl)
        self.gate.set_rate(self.settings.rate / max(1, live))
        # Let the others see us and lower their share before we send anything.
        await self.clock.sleep(HEARTBEAT_EVERY * 1.5)
        live = await self.ledger.heartbeat(self.worker_id, ttl)
        self.gate.set_rate(self.settings.rate / max(1, live))
        log.info("joined the job as worker %s (%d live workers)", self.worker_id, live,
                 extra=event(WORKER_JOINED, worker=self.worker_id, live=live))

    async def _leave(self) -> None:
        try:
            await self.ledger.deregister_worker(self.worker_id)
        except LedgerError as err:
            log.warning("could not leave the job cleanly (its leases expire): %s", err,
                        extra=event(WORKER_LEAVE_FAILED, worker=self.worker_id,
                                    error=str(err)))

    async def _heartbeat(self) -> None:
        """Renew this worker's leases; take its share of the job's --rate."""
        while True:
            try:
                live = await self.ledger.heartbeat(self.worker_id, self.settings.lease_ttl)
                share = self.settings.rate / max(1, live)
                if abs(share - self.gate.rate) > 1e-9:
                    log.info("this host's share of --rate is now %.2f req/s (%d live workers)",
                             share, live,
                             extra=event(RATE_SHARE_CHANGED, rate=round(share, 3), live=live))
                    self.gate.set_rate(share)
            except LedgerError as err:
                log.warning("heartbeat failed: %s", err,
                            extra=event(WORKER_HEARTBEAT_FAILED, worker=self.worker_id,
                                        error=str(err)))
            await self.clock.sleep(HEARTBEAT_EVERY)


def membership_for(ledger: Ledger, shared: Callable[[LeasingLedger], Membership]
                   ) -> Membership:
    """The one decision: a shared ledger means leasing (``shared(ledger)``), a private
    one means :class:`Solo`."""
    return shared(ledger) if is_shared(ledger) else Solo()

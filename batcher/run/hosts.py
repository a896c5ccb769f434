"""Who works on the job: this run alone, or several hosts sharing one ledger.

The ledger says which (``Ledger.shared``), once; the runner then holds one
:class:`Membership` and never asks again.

* :class:`Solo` — a private (SQLite) ledger, locked to this run: every row
  goes to work as it is imported.
* :class:`Shared` — a ledger several hosts share (PostgreSQL): this run joins
  as a worker and works only on rows it has leased. A heartbeat renews its
  leases; a dead host's leases expire and the others take its rows over: rows
  with a generation id are polled, the others posted again with their key (a
  replay, never a second charge). A host that was paused past its lease
  finds out before its next post (``hold``, in the stages) and drops the row.
  ``--rate`` is not split here: the run's gate draws every request's send
  time from the job's one pace in the ledger
  (:class:`~batcher.ratelimit_shared.SharedRateGate`), so the hosts' sum stays
  under it however many there are.
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
    WORKER_HEARTBEAT_FAILED,
    WORKER_JOINED,
    WORKER_LEAVE_FAILED,
    event,
)
from ..settings import Settings

__all__ = ["Dispatch", "Membership", "Shared", "Solo", "membership_for"]

log = logging.getLogger(__name__)

# A lease lasts --lease-ttl seconds and is renewed by a heartbeat every
# HEARTBEAT_EVERY; a new worker waits a little over one heartbeat before it
# leases, so hosts started together see each other first and none leases
# the others' share of the rows.
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

    async def holds(self, row_id: str) -> bool:
        """Whether this run may still send for the row (renewing its lease if leased)."""
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

    async def holds(self, row_id: str) -> bool:
        """Every row is this run's: the ledger's lock says so."""
        return True


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
        clock: Clock,
        run_info: RunInfo,
        stopping: Callable[[], bool],
        stopped: Callable[[], bool],
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.clock = clock
        self.run_info = run_info
        self.worker_id = f"w-{uuid.uuid4().hex[:16]}"
        self.leased: set[str] = set()
        self.live = 1  # live workers, as of the last heartbeat
        self._stopping = stopping
        self._stopped = stopped

    @asynccontextmanager
    async def joined(self) -> AsyncIterator[None]:
        """Register, heartbeat while the block runs, leave."""
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
            share = self.settings.rate / max(1, self.live)
            hold = max(2 * self.settings.concurrency, int(share * LEASE_HOLD_SECONDS))
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

    async def holds(self, row_id: str) -> bool:
        """Whether this worker's lease on the row is unexpired (then renewed), by the
        ledger's clock. False after a pause longer than --lease-ttl: the row may be
        another host's now, and this one forgets it."""
        if await self.ledger.hold(self.worker_id, row_id, self.settings.lease_ttl):
            return True
        self.leased.discard(row_id)
        return False

    async def _join(self) -> None:
        ttl = self.settings.lease_ttl
        await self.ledger.register_worker(self.worker_id, self.run_info, ttl)
        await self.ledger.heartbeat(self.worker_id, ttl)
        await self.clock.sleep(HEARTBEAT_EVERY * 1.5)
        self.live = live = await self.ledger.heartbeat(self.worker_id, ttl)
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
        """Renew this worker's leases; count the live workers."""
        while True:
            try:
                self.live = await self.ledger.heartbeat(self.worker_id, self.settings.lease_ttl)
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

"""A ledger that waits out its database's outages instead of failing the run.

A PostgreSQL restart, a failover, a pooler dropping connections, a SQLite
file locked by a backup or on a full disk: each makes one write fail with
:class:`~batcher.errors.LedgerUnreachable`, and a moment later the same write
succeeds. :class:`PatientLedger` wraps the run's ledger and tries every call
again, with backoff, until it succeeds or the outage has lasted longer than
the run's patience; then it raises :class:`~batcher.errors.LedgerUnavailable`
(exit 3, resumable). The caller keeps what it meant to write (what the API
answered) in memory meanwhile: nothing is lost, nothing fails.

A write whose answer was lost may have been committed all the same. A
compare-and-set tried again after a lost answer then finds the row already
moved: when the row is now where the write was taking it, the write is taken
as done (:meth:`PatientLedger.transition`).

Submissions pause while the ledger is away (:meth:`PatientLedger.wait_available`):
no generation is bought whose answer could not be recorded.

Time comes from the injected :class:`~batcher.clock.Clock` only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from batcher.clock import Clock
from batcher.errors import LedgerUnavailable, LedgerUnreachable, TransitionConflict
from batcher.ledger.base import LeasingLedger, Ledger, NextMove, PaceClaim, is_shared
from batcher.ledger.webhook_events import StoredEvent
from batcher.model import Event, LedgerRow, NewRow, RunInfo, Stage, Update, UploadPart
from batcher.ops.logs import LEDGER_REACHABLE, LEDGER_UNREACHABLE, event
from batcher.webhooks.events import GenerationEvent
from batcher.webhooks.sink import Disposition

__all__ = ["PatientLedger", "patient", "wait_for_ledger"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Backoff between tries while the ledger is away: from FIRST_WAIT, doubled, up to MAX_WAIT.
FIRST_WAIT = 0.25
MAX_WAIT = 5.0
# Closing (recording the run's end) is tried this long at most: the run is over.
CLOSE_PATIENCE = 10.0


class PatientLedger:
    """Wraps a :class:`Ledger`; see the module docstring.

    ``patience`` is in seconds, measured from the first failure that no
    success has followed.
    """

    def __init__(self, inner: Ledger, *, clock: Clock, patience: float) -> None:
        self.inner = inner
        self.description = inner.description
        self.shared = inner.shared
        self._clock = clock
        self.patience = patience
        self._down_since: float | None = None
        self._gave_up: LedgerUnavailable | None = None
        self.outages = 0

    def __repr__(self) -> str:
        return f"PatientLedger({self.inner!r}, patience={self.patience:g})"

    @property
    def down_since(self) -> float | None:
        """Clock time of the first failure no success has followed, or None."""
        return self._down_since

    # -- the waiting -------------------------------------------------------

    def _unavailable(self, err: LedgerUnreachable, down: float) -> LedgerUnavailable:
        gave_up = LedgerUnavailable(
            f"the ledger {self.description} has been unavailable for {down:.0f} s "
            f"(--outage-patience {self.patience:.0f} s): {err}; rows keep their stages: "
            "run the same command again to finish")
        self._gave_up = gave_up
        return gave_up

    def _failed(self, err: LedgerUnreachable) -> float:
        """Note a failure; return how long the ledger has been away."""
        now = self._clock.now()
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
            log.warning("the ledger %s does not answer: waiting (up to %.0f s): %s",
                        self.description, self.patience, err,
                        extra=event(LEDGER_UNREACHABLE, ledger=self.description,
                                    error=str(err)))
        return now - self._down_since

    def _succeeded(self) -> None:
        if self._down_since is not None:
            down = self._clock.now() - self._down_since
            self._down_since = None
            log.warning("the ledger %s answers again after %.1f s", self.description, down,
                        extra=event(LEDGER_REACHABLE, ledger=self.description,
                                    down_seconds=round(down, 3)))

    async def _patient(self, call: Callable[[], Awaitable[T]], *,
                       patience: float | None = None) -> T:
        if self._gave_up is not None and patience is None:
            raise self._gave_up
        limit = self.patience if patience is None else patience
        wait = FIRST_WAIT
        while True:
            try:
                result = await call()
            except LedgerUnreachable as err:
                down = self._failed(err)
                if down >= limit:
                    raise self._unavailable(err, down) from None
                await self._clock.sleep(min(wait, limit - down + 0.01))
                wait = min(MAX_WAIT, wait * 2)
                continue
            self._succeeded()
            return result

    async def wait_available(self) -> None:
        """Return once the ledger answers (at once when it does); LedgerUnavailable
        once it has been away longer than the patience."""
        while self._down_since is not None:
            if self._gave_up is not None:
                raise self._gave_up
            down = self._clock.now() - self._down_since
            if down >= self.patience:
                raise LedgerUnavailable(
                    f"the ledger {self.description} has been unavailable for {down:.0f} s "
                    f"(--outage-patience {self.patience:.0f} s); rows keep their stages: "
                    "run the same command again to finish")
            await self._clock.sleep(min(FIRST_WAIT * 2, self.patience - down + 0.01))

    # -- Ledger ------------------------------------------------------------

    async def open(self, run: RunInfo, *, lock: bool = True) -> None:
        """Open the inner ledger (not waited for: a ledger away at the start is exit 2)."""
        await self.inner.open(run, lock=lock)

    async def close(self, exit_code: int | None = None) -> None:
        """Record the run's end, briefly patient: the run is over either way."""
        await self._patient(lambda: self.inner.close(exit_code),
                            patience=min(self.patience, CLOSE_PATIENCE))

    async def import_rows(self, rows: Sequence[NewRow]) -> list[LedgerRow]:
        """See :meth:`Ledger.import_rows` (an import is safe to repeat)."""
        return await self._patient(lambda: self.inner.import_rows(rows))

    async def finish_import(self) -> int:
        """See :meth:`Ledger.finish_import`."""
        return await self._patient(self.inner.finish_import)

    async def transition(
        self,
        row_id: str,
        expect: Stage | frozenset[Stage],
        to: Stage,
        update: Update | None = None,
        *,
        event: str,
        detail: Mapping[str, Any] | None = None,
        current: LedgerRow | None = None,
        then: NextMove | None = None,
    ) -> LedgerRow:
        """See :meth:`Ledger.transition`; a write whose answer was lost counts as done
        when the row is found where it was going (with ``then``: where the second
        move was going)."""
        lost = False
        going = to if then is None else then.to

        async def once() -> LedgerRow:
            nonlocal lost
            try:
                return await self.inner.transition(row_id, expect, to, update, event=event,
                                                   detail=detail, current=current, then=then)
            except LedgerUnreachable:
                lost = True
                raise
            except TransitionConflict:
                if not lost:
                    raise
                fresh = await self.inner.get(row_id)
                if fresh is not None and fresh.stage is going:
                    return fresh
                if then is not None and fresh is not None and fresh.stage is to:
                    # The first move was made, the second not (a backend that
                    # makes them one after the other): make the second now.
                    return await self.inner.transition(
                        row_id, to, then.to, then.update, event=then.event,
                        detail=then.detail, current=fresh)
                raise

        return await self._patient(once)

    async def record_part(self, row_id: str, upload_id: str, part: UploadPart) -> None:
        """See :meth:`Ledger.record_part`."""
        await self._patient(lambda: self.inner.record_part(row_id, upload_id, part))

    async def upload_parts(self, row_id: str, upload_id: str) -> list[UploadPart]:
        """See :meth:`Ledger.upload_parts`."""
        return await self._patient(lambda: self.inner.upload_parts(row_id, upload_id))

    async def forget_parts(self, row_id: str) -> None:
        """See :meth:`Ledger.forget_parts`."""
        await self._patient(lambda: self.inner.forget_parts(row_id))

    async def get(self, row_id: str) -> LedgerRow | None:
        """See :meth:`Ledger.get`."""
        return await self._patient(lambda: self.inner.get(row_id))

    async def group_rows(self, group: str) -> list[LedgerRow]:
        """See :meth:`Ledger.group_rows`."""
        return await self._patient(lambda: self.inner.group_rows(group))

    def rows(self, *, stages: frozenset[Stage] | None = None,
             include_retired: bool = False) -> AsyncIterator[LedgerRow]:
        """See :meth:`Ledger.rows` (not retried: a scan cannot resume halfway)."""
        return self.inner.rows(stages=stages, include_retired=include_retired)

    async def counts(self, *, include_retired: bool = False) -> dict[Stage, int]:
        """See :meth:`Ledger.counts`."""
        return await self._patient(lambda: self.inner.counts(include_retired=include_retired))

    async def error_summary(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """See :meth:`Ledger.error_summary`."""
        return await self._patient(lambda: self.inner.error_summary(limit))

    async def events(self, row_id: str) -> list[Event]:
        """See :meth:`Ledger.events`."""
        return await self._patient(lambda: self.inner.events(row_id))

    async def runs(self) -> list[dict[str, Any]]:
        """See :meth:`Ledger.runs`."""
        return await self._patient(self.inner.runs)

    async def record_webhook_event(self, event: GenerationEvent, message_id: str
                                   ) -> Disposition:
        """See :meth:`WebhookLedger.record_webhook_event` (a message id is kept once)."""
        return await self._patient(lambda: self.inner.record_webhook_event(event, message_id))

    async def webhook_events_since(self, seq: int, limit: int = 1000) -> list[StoredEvent]:
        """See :meth:`WebhookLedger.webhook_events_since`."""
        return await self._patient(lambda: self.inner.webhook_events_since(seq, limit))

    async def add_webhook_counts(self, deltas: Mapping[str, int]) -> None:
        """See :meth:`WebhookLedger.add_webhook_counts` (informative counters)."""
        await self._patient(lambda: self.inner.add_webhook_counts(deltas))

    async def webhook_counts(self) -> dict[str, int]:
        """See :meth:`WebhookLedger.webhook_counts`."""
        return await self._patient(self.inner.webhook_counts)


class PatientLeasingLedger(PatientLedger):
    """A :class:`PatientLedger` over a shared (leasing) ledger."""

    def __init__(self, inner: LeasingLedger, *, clock: Clock, patience: float) -> None:
        super().__init__(inner, clock=clock, patience=patience)
        self.leasing = inner

    async def register_worker(self, worker_id: str, run: RunInfo, ttl: float) -> None:
        """See :meth:`LeasingLedger.register_worker` (repeatable)."""
        await self._patient(lambda: self.leasing.register_worker(worker_id, run, ttl))

    async def heartbeat(self, worker_id: str, ttl: float) -> int:
        """See :meth:`LeasingLedger.heartbeat`."""
        return await self._patient(lambda: self.leasing.heartbeat(worker_id, ttl))

    async def lease(self, worker_id: str, limit: int, ttl: float) -> list[LedgerRow]:
        """See :meth:`LeasingLedger.lease` (a lease whose answer was lost expires)."""
        return await self._patient(lambda: self.leasing.lease(worker_id, limit, ttl))

    async def hold(self, worker_id: str, row_id: str, ttl: float) -> bool:
        """See :meth:`LeasingLedger.hold`."""
        return await self._patient(lambda: self.leasing.hold(worker_id, row_id, ttl))

    async def claim_slots(self, count: int, *, lead: float, margin: float,
                          rate: float | None = None, pause: float | None = None) -> PaceClaim:
        """See :meth:`LeasingLedger.claim_slots`."""
        return await self._patient(lambda: self.leasing.claim_slots(
            count, lead=lead, margin=margin, rate=rate, pause=pause))

    async def release(self, worker_id: str, row_ids: Sequence[str]) -> None:
        """See :meth:`LeasingLedger.release`."""
        await self._patient(lambda: self.leasing.release(worker_id, row_ids))

    async def deregister_worker(self, worker_id: str) -> None:
        """See :meth:`LeasingLedger.deregister_worker` (briefly: leases expire anyway)."""
        await self._patient(lambda: self.leasing.deregister_worker(worker_id),
                            patience=min(self.patience, CLOSE_PATIENCE))

    async def live_workers(self) -> list[dict[str, Any]]:
        """See :meth:`LeasingLedger.live_workers`."""
        return await self._patient(self.leasing.live_workers)

    async def pending_work(self) -> tuple[int, int]:
        """See :meth:`LeasingLedger.pending_work`."""
        return await self._patient(self.leasing.pending_work)


def patient(ledger: Ledger, *, clock: Clock, patience: float) -> PatientLedger:
    """``ledger`` wrapped to wait out outages (a shared one stays a LeasingLedger)."""
    if isinstance(ledger, PatientLedger):
        return ledger
    if is_shared(ledger):
        return PatientLeasingLedger(ledger, clock=clock, patience=patience)
    return PatientLedger(ledger, clock=clock, patience=patience)


async def wait_for_ledger(ledger: Ledger) -> None:
    """Return once ``ledger`` answers (at once unless a PatientLedger waits out an outage)."""
    if isinstance(ledger, PatientLedger):
        await ledger.wait_available()

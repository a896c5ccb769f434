"""What the stages of one run share: moving rows, failing them, halting.

Every write to a row goes through :meth:`RunContext.move`: a compare-and-set
from the stage the caller saw, carrying the HTTP attempts and polls counted
since the row's last write. A halt is recorded here, once; the stages only
ask whether one happened.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyio import CancelScope

from ..breaker import unanswered
from ..client import DiffioClient
from ..clock import Clock, WallTime
from ..errors import ApiError, LeaseLost, LedgerError, RunHalted, TransitionConflict
from ..ledger.base import Ledger, NextMove
from ..model import ACTIVE_STAGES, LedgerRow, Stage, Update
from ..ops.logs import (
    REQUEST_RETRY_SCHEDULED,
    ROW_FAILED,
    ROW_MOVED_ELSEWHERE,
    RUN_HALTED,
    event,
)
from ..ratelimit import Gate
from ..retry import RetryPolicy, retrying
from ..settings import Settings
from .hosts import Membership
from .stats import RunStats

__all__ = ["HaltState", "RunContext"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# --halt-after judges the failure share only after this many finished rows.
HALT_AFTER_MIN_SAMPLE = 20
# The least wait before a request is tried again during a suspected outage.
OUTAGE_RETRY_FLOOR = 1.0


@dataclass(slots=True)
class HaltState:
    """Why the run stopped submitting, if it did; ``hard`` when it stops everything."""

    error: ApiError | RunHalted | None = None
    hard: bool = False


@dataclass(eq=False)
class RunContext:
    """The parts of one run every stage uses, and the row mover."""

    settings: Settings
    ledger: Ledger
    client: DiffioClient
    gate: Gate
    clock: Clock
    rng: random.Random
    policy: RetryPolicy
    stats: RunStats
    membership: Membership
    halts: HaltState
    wall: WallTime = time.time
    # The run's cancel scope, once it runs (a hard halt cancels it).
    scope: CancelScope | None = field(default=None, init=False)
    # Counted since the row's last write; the next write adds them.
    _attempts: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _polls: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    # ---------------------------------------------------------------- counters

    def count_attempt(self, row_id: str) -> None:
        """One HTTP attempt spent on the row (written with its next move)."""
        self._attempts[row_id] = self._attempts.get(row_id, 0) + 1

    def count_poll(self, row_id: str) -> None:
        """One progress poll of the row (written with its next move)."""
        self._polls[row_id] = self._polls.get(row_id, 0) + 1

    # ------------------------------------------------------------------ halts

    @property
    def halted(self) -> bool:
        """True once the run stopped submitting (any halt)."""
        return self.halts.error is not None

    def halt(self, err: ApiError | RunHalted) -> None:
        """Stop submitting; stop everything when ``err.halts_run``. The first reason is kept."""
        if self.halts.error is None:
            self.halts.error = err
            self.stats.halted = f"{err.code}: {err}"
            log.error("run halted: %s", err, extra=event(RUN_HALTED, code=err.code))
        self.halts.hard = self.halts.hard or err.halts_run
        # Posts already waiting for the rate gate give up instead of meeting
        # the same refusal one by one (and delaying the polls behind them).
        # Not on --max-spend: those posts reserved their cost within the cap.
        if err.code != "maxSpendReached":
            self.client.stop_generations()

    def cancel(self) -> None:
        """Cancel the whole run (a hard halt, once its error is recorded).

        Every stage task stops at its next wait; the workers need not return.
        """
        if self.scope is not None:
            self.scope.cancel()

    def drop(self, row_id: str) -> None:
        """A row this run stops working on without finishing it (a halt)."""
        self.stats.in_flight -= 1
        self.membership.release(row_id)

    async def check_lease(self, row_id: str) -> None:
        """Right before a request that may cost money: raise LeaseLost unless this
        run still holds the row (always, on a private ledger)."""
        if not await self.membership.holds(row_id):
            raise LeaseLost(row_id)

    def lost(self, row_id: str, err: TransitionConflict, step: str) -> None:
        """Another host moved the row, or took it over: drop it and go on.

        Only on a shared ledger; on a private one a lost compare-and-set is a
        bug and ``err`` is raised again.
        """
        if not self.membership.shared:
            raise err
        log.info("row %s is another host's now (%s); this host lets it go", row_id, err,
                 extra=event(ROW_MOVED_ELSEWHERE, row=row_id, step=step))
        self.drop(row_id)

    def check_failure_share(self) -> None:
        """--halt-after PCT: stop submitting when too many rows fail."""
        limit = self.settings.halt_after
        finished = self.stats.done + self.stats.failed
        if limit is None or finished < HALT_AFTER_MIN_SAMPLE or self.halted:
            return
        share = 100.0 * self.stats.failed / finished
        if share > limit:
            self.halt(RunHalted(
                f"--halt-after {limit:g}: {self.stats.failed} of {finished} finished rows "
                f"failed ({share:.1f}%)", code="haltAfter"))

    # --------------------------------------------------------------- requests

    async def call(self, row_id: str, fn: Callable[[], Awaitable[T]]) -> T:
        """One API operation under the retry policy; counts attempts per row.

        (A 429 has already slowed the shared rate gate inside the client.)
        """

        async def attempt() -> T:
            try:
                return await fn()
            except ApiError as err:
                err.row_id = err.row_id or row_id
                raise

        def retried(err: ApiError, made: int, wait: float) -> None:
            log.info("attempt %d failed, retrying in %.2f s: %s", made, wait, err,
                     extra=event(REQUEST_RETRY_SCHEDULED, row=row_id, code=err.code,
                                 attempt=made, wait=round(wait, 3)))
            self.stats.errors[f"retried:{err.code}"] += 1

        return await retrying(attempt, self.decide, clock=self.clock,
                              before=lambda: self.count_attempt(row_id), on_retry=retried)

    def decide(self, err: ApiError, made: int) -> float | None:
        """The retry policy's decision, with this run's random source.

        A request the host did not answer, while no other request was
        answered since it first failed (maybe an outage), is tried again
        without a bound:
        the host's breaker pauses it and ends the run resumably once the
        outage outlasts the patience. No row fails from an outage.
        """
        wait = self.policy.decide(err, made, self.rng)
        if wait is None and self.outage_suspected(err):
            return max(OUTAGE_RETRY_FLOOR, self.policy.backoff(made, self.rng))
        return wait

    @staticmethod
    def outage_suspected(err: ApiError) -> bool:
        """``err`` got no answer, and the host answered nobody since it first
        failed: maybe an outage, not the request's fault."""
        return err.outage and unanswered(err)

    async def api_failure(self, row: LedgerRow, err: ApiError) -> None:
        """An API error ended the row's step: halt (row kept) or fail the row."""
        if err.halts_submissions:
            self.halt(err)
            # The row keeps its stage (resumable); the error is recorded.
            current = await self.ledger.get(row.row_id)
            if current is not None and current.stage in ACTIVE_STAGES:
                await self.move(current, current.stage, {"error": err.to_record()}, "halted")
            self.drop(row.row_id)
            if err.halts_run:
                self.cancel()
            return
        current = await self.ledger.get(row.row_id)
        await self.fail(current or row, err.to_record())

    # ------------------------------------------------------------------- rows

    async def fail(self, row: LedgerRow, error: Mapping[str, Any], *,
                   api_status: str | None = None) -> None:
        """Move the row to FAILED with ``error`` (a no-op when it already is)."""
        update: Update = {"error": error}
        if api_status is not None:
            update["api_status"] = api_status
        if row.stage is Stage.FAILED:
            return
        try:
            await self.move(row, Stage.FAILED, update, "failed", {"code": error.get("code")})
        except TransitionConflict:
            # Our copy is stale; on a shared ledger the row may be another host's now.
            await self.check_lease(row.row_id)
            fresh = await self.ledger.get(row.row_id)
            if fresh is None or fresh.stage is Stage.FAILED:
                return
            await self.move(fresh, Stage.FAILED, update, "failed", {"code": error.get("code")})
        self.stats.failed += 1
        self.stats.in_flight -= 1
        self.stats.errors[str(error.get("code"))] += 1
        self.check_failure_share()
        log.warning("row %s failed: %s: %s", row.row_id, error.get("code"),
                    error.get("message"),
                    extra=event(ROW_FAILED, row=row.row_id, code=error.get("code")))

    async def move(
        self,
        row: LedgerRow,
        to: Stage,
        update: Update,
        event: str,
        detail: Mapping[str, Any] | None = None,
        *,
        then: NextMove | None = None,
    ) -> LedgerRow:
        """A compare-and-set from the row's stage, carrying pending counters.

        ``then``: a second move in the same ledger write (see ``Ledger.transition``).
        """
        full: Update = dict(update)  # type: ignore[assignment]
        attempts = self._attempts.pop(row.row_id, 0)
        polls = self._polls.pop(row.row_id, 0)
        if attempts:
            full["attempts_delta"] = attempts
        if polls:
            full["polls_delta"] = polls
        try:
            moved = await self.ledger.transition(row.row_id, row.stage, to, full,
                                                 event=event, detail=detail, current=row,
                                                 then=then)
            if moved.stage not in ACTIVE_STAGES:
                self.membership.release(row.row_id)
            return moved
        except LedgerError:
            # Put the counters back so they are not lost with the failed write.
            if attempts:
                self._attempts[row.row_id] = self._attempts.get(row.row_id, 0) + attempts
            if polls:
                self._polls[row.row_id] = self._polls.get(row.row_id, 0) + polls
            raise

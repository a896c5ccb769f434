"""The submit stage: post the generation (a file row once :mod:`.upload` has it up).

A row is posted only with its ledger key, and a file row only once its
project id is committed and its upload confirmed with the bytes it was keyed
on: a re-post after any crash is a free replay (the API derives the
generation from key and project), never a second charge.
"""

from __future__ import annotations

import logging

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..answers import GenerationAccepted, GenerationStatus
from ..errors import (
    ApiError,
    LocalFileError,
    RunHalted,
    SubmissionsStopped,
    TransitionConflict,
    TransportError,
)
from ..ledger.base import NextMove
from ..ledger.patient import wait_for_ledger
from ..model import Kind, LedgerRow, Stage, Update
from ..spend import SpendCap
from .context import RunContext
from .poll import Polling
from .streams import take
from .upload import Uploader

__all__ = ["Submitter"]

log = logging.getLogger(__name__)


class Submitter:
    """Submit workers take rows from a stream and hand accepted ones to polling."""

    def __init__(self, ctx: RunContext, polling: Polling) -> None:
        self.ctx = ctx
        self.polling = polling
        self.uploader = Uploader(ctx)
        self.spend: SpendCap | None = None
        settings = ctx.settings
        if settings.price_per_minute is not None:
            self.spend = SpendCap(settings.price_per_minute, settings.max_spend)

    async def worker(self, recv: MemoryObjectReceiveStream[LedgerRow]) -> None:
        """Submit each row received, until the stream ends or the run stops."""
        async with recv:
            while (row := await take(recv)) is not None:
                if self.ctx.halted:
                    self.ctx.drop(row.row_id)
                    continue
                try:
                    await self.submit(row)
                except TransitionConflict as err:
                    # A shared ledger: another host moved the row, or took it
                    # over while this one was paused.
                    self._settle_spend(row.row_id, charged=False)
                    self.ctx.lost(row.row_id, err, "submit")

    # ------------------------------------------------------------------ spend

    async def count_earlier_spend(self) -> None:
        """The cap covers the job: count what earlier runs already submitted."""
        spend = self.spend
        if spend is None or spend.cap is None:
            return
        stages = frozenset({Stage.SUBMITTED, Stage.GENERATED, Stage.COMPLETE, Stage.FAILED})
        async for row in self.ctx.ledger.rows(stages=stages):
            if row.generation_id and row.leader_row_id is None:
                await anyio.to_thread.run_sync(spend.add_earlier, row)

    async def _reserve(self, row: LedgerRow) -> bool:
        """Reserve the submission's estimated cost; False (and halt) past the cap."""
        if self.spend is None:
            return True
        usd = await anyio.to_thread.run_sync(self.spend.estimate, row)
        if self.spend.try_reserve(row.row_id, usd):
            return True
        self.ctx.halt(RunHalted(
            f"--max-spend reached: the next submission (${usd:,.2f}) would pass the cap; "
            f"{self.spend.figures()}. Re-run with a higher --max-spend to go on.",
            code="maxSpendReached"))
        return False

    def _settle_spend(self, row_id: str, *, charged: bool) -> None:
        if self.spend is not None:
            self.ctx.stats.estimated_spend += self.spend.settle(row_id, charged=charged)

    # ------------------------------------------------------------- submission

    async def submit(self, row: LedgerRow) -> None:
        """Take one row from where the ledger has it to an accepted generation."""
        ctx = self.ctx
        try:
            if row.kind is Kind.FILE:
                uploaded = await self.uploader.ensure_uploaded(row)
                if uploaded is None:
                    return
                row = uploaded
            if ctx.halted:
                ctx.drop(row.row_id)
                return
            assert row.api_project_id is not None and row.idempotency_key is not None
            if not await self._reserve(row):
                ctx.drop(row.row_id)
                return
            project, key = row.api_project_id, row.idempotency_key
            # Nothing is bought while its answer could not be recorded.
            await wait_for_ledger(ctx.ledger)
            if ctx.halted:
                self._settle_spend(row.row_id, charged=False)
                ctx.drop(row.row_id)
                return

            async def post() -> GenerationAccepted:
                # A host paused past its lease finds out here, before it posts.
                await ctx.check_lease(row.row_id)
                return await ctx.client.create_generation(
                    model=row.model_key, api_project_id=project, sampling=row.sampling,
                    params=row.params, idempotency_key=key)

            try:
                accepted = await ctx.call(row.row_id, post)
            except ApiError as err:
                # No answer at all: the API may have charged; count it, to be safe.
                self._settle_spend(row.row_id, charged=isinstance(err, TransportError))
                raise
            # A replay counts too: rows whose generation is already in the
            # ledger are polled, never posted, so a replay answers a post whose
            # answer was lost (in this run or a killed one) and was charged.
            self._settle_spend(row.row_id, charged=True)
        except SubmissionsStopped:
            # Never sent: the row stays where it is, for the next run.
            self._settle_spend(row.row_id, charged=False)
            ctx.drop(row.row_id)
            return
        except ApiError as err:
            await ctx.api_failure(row, err)
            return
        except LocalFileError as err:
            await ctx.fail(row, err.to_record())
            return
        ctx.stats.submitted += 1
        if accepted.replay:
            ctx.stats.replays += 1
        accepted_update: Update = {
            "generation_id": accepted.generation_id,
            "api_project_id": accepted.api_project_id or row.api_project_id,
            "api_status": accepted.api_status,
            # A 402/401 recorded by a halted run is history once accepted.
            "error": None,
        }
        event = "replayed" if accepted.replay else "submitted"
        detail = {"generationId": accepted.generation_id, "replay": accepted.replay}
        if accepted.status is GenerationStatus.COMPLETE and row.kind is not Kind.FILE:
            # Finished already (a replay of a done generation, or an instant
            # one): accepted and complete in one ledger write, no poll.
            done: Update = {"api_status": accepted.api_status}
            if row.queue_position is not None:
                done["queue_position"] = None
            await ctx.move(row, Stage.SUBMITTED, accepted_update, event, detail,
                           then=NextMove(Stage.COMPLETE, done, "complete"))
            self.polling.finished(row.row_id)
            return
        row = await ctx.move(row, Stage.SUBMITTED, accepted_update, event, detail)
        await self.polling.after_status(row, accepted.status, accepted.api_status, poll=None,
                                        accepted_at=accepted.accepted_at)

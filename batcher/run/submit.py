"""The submit stage: create the project, upload the file, post the generation.

A row is posted only with its ledger key, and a file row only after its
project id is committed: a re-post after any crash is a free replay (the API
derives the generation from key and project), never a second charge.
"""

from __future__ import annotations

import functools
import logging
import mimetypes
from datetime import datetime
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..errors import (
    ApiError,
    LocalFileError,
    RunHalted,
    SubmissionsStopped,
    TransportError,
    UrlExpired,
)
from ..model import Kind, LedgerRow, Stage
from ..ops.logs import UPLOAD_URL_EXPIRED, event
from ..retry import retrying
from ..spend import SpendCap
from .context import RunContext
from .poll import Polling

__all__ = ["Submitter"]

log = logging.getLogger(__name__)

# An upload URL that keeps expiring gets this many fresh projects, no more.
FRESH_PROJECT_LIMIT = 3


class Submitter:
    """Submit workers take rows from a stream and hand accepted ones to polling."""

    def __init__(self, ctx: RunContext, polling: Polling) -> None:
        self.ctx = ctx
        self.polling = polling
        self.spend: SpendCap | None = None
        settings = ctx.settings
        if settings.price_per_minute is not None:
            self.spend = SpendCap(settings.price_per_minute, settings.max_spend)

    async def worker(self, recv: MemoryObjectReceiveStream[LedgerRow]) -> None:
        """Submit each row received, until the stream ends or the run stops."""
        async with recv:
            async for row in recv:
                if self.ctx.halted:
                    self.ctx.drop(row.row_id)
                    continue
                await self.submit(row)

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
                uploaded = await self._ensure_uploaded(row)
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
            try:
                accepted = await ctx.call(row.row_id, lambda: ctx.client.create_generation(
                    model=row.model_key, api_project_id=project, sampling=row.sampling,
                    params=row.params, idempotency_key=key))
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
        row = await ctx.move(row, Stage.SUBMITTED, {
            "generation_id": accepted.generation_id,
            "api_project_id": accepted.api_project_id or row.api_project_id,
            "api_status": accepted.api_status,
            # A 402/401 recorded by a halted run is history once accepted.
            "error": None,
        }, "replayed" if accepted.replay else "submitted",
            {"generationId": accepted.generation_id, "replay": accepted.replay})
        await self.polling.after_status(row, accepted.status, accepted.api_status, poll=None)

    async def _ensure_uploaded(self, row: LedgerRow) -> LedgerRow | None:
        """Create the project (durably) and upload the file; None when failed.

        An upload URL refused as expired gets a fresh project: no generation
        exists on the old one (one is posted only after UPLOADED is
        committed), so a fresh project costs nothing. At most
        FRESH_PROJECT_LIMIT of them.
        """
        ctx = self.ctx
        assert row.source_path is not None
        path = Path(row.source_path)
        current = row
        fresh = 0

        async def attempt() -> LedgerRow:
            nonlocal current, fresh
            if current.stage is Stage.PENDING or (
                current.stage is Stage.PROJECT_CREATED and self._upload_expired(current)
            ):
                fresh += 1
                current = await self._create_project(current, path)
            if current.stage is not Stage.PROJECT_CREATED:
                return current
            assert current.upload_url is not None
            try:
                await ctx.call(current.row_id, functools.partial(
                    ctx.client.storage.upload, url=current.upload_url,
                    method=current.upload_method or "PUT", path=path,
                    content_type=current.content_type or "application/octet-stream",
                    size=current.source_size or 0))
            except UrlExpired:
                log.info("upload URL of row %s expired: a fresh project", current.row_id,
                         extra=event(UPLOAD_URL_EXPIRED, row=current.row_id))
                current = await ctx.move(current, Stage.PROJECT_CREATED,
                                         {"upload_expires_at": "expired"}, "uploadExpired")
                raise
            return await ctx.move(current, Stage.UPLOADED, {"upload_url": None}, "uploaded")

        def decide(err: ApiError, made: int) -> float | None:
            return 0.0 if isinstance(err, UrlExpired) and fresh < FRESH_PROJECT_LIMIT else None

        try:
            return await retrying(attempt, decide, clock=ctx.clock)
        except UrlExpired:
            await ctx.fail(current, {"code": "uploadExpired", "httpStatus": None,
                                     "message": "upload URL expired on "
                                     f"{FRESH_PROJECT_LIMIT} fresh projects"})
            return None

    async def _create_project(self, row: LedgerRow, path: Path) -> LedgerRow:
        ctx = self.ctx
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        size = row.source_size
        if size is None:
            size = (await anyio.Path(path).stat()).st_size
        created = await ctx.call(row.row_id, lambda: ctx.client.create_project(
            file_name=path.name, content_type=ctype, content_length=size))
        # The project id is durable before anything else happens: a generation
        # is keyed on (key, project), so a second project would be a second charge.
        return await ctx.move(row, Stage.PROJECT_CREATED, {
            "api_project_id": created.api_project_id,
            "upload_url": created.upload_url,
            "upload_method": created.upload_method,
            "upload_expires_at": created.expires_at,
            "content_type": ctype,
        }, "projectCreated", {"apiProjectId": created.api_project_id})

    def _upload_expired(self, row: LedgerRow) -> bool:
        if row.upload_url is None:
            return True
        stamp = row.upload_expires_at
        if not stamp:
            return False
        if stamp == "expired":
            return True
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return False
        # A margin so an upload does not start on a URL about to lapse.
        return when <= self.ctx.wall() + 30

"""One run of a job: read → key → ledger → gate → submit → poll → download → publish.

This module only wires the stages, each in a module of its own:

* :mod:`batcher.intake` reads the manifest (:mod:`batcher.manifest`) and keys
  its rows (:mod:`batcher.keys`), in batches; the ledger imports them;
* :mod:`.resume` decides what each ledger row needs next to its manifest row;
* :mod:`.hosts` says who works on which row (this run alone, or leases on a
  ledger several hosts share);
* :mod:`.submit` creates projects, uploads and posts generations;
* :mod:`.poll` watches submitted generations;
* :mod:`.download` fetches finished outputs, :mod:`batcher.outputs` publishes
  them;
* :mod:`.followers` settles rows that repeat another row's request.

Shape: one anyio task group; the import feeds a bounded stream to N submit
workers; one poller holds submitted generations; download workers fetch
finished file rows. Every API call passes the client's one rate gate
(:mod:`batcher.ratelimit`) and one concurrency cap. The invariants the stages keep together:

* a row is posted only with its ledger key, and only after its project id
  (file rows) is committed: a re-post after any crash is a free replay;
* a row leaves the ``pending`` family only through a committed transition, so
  a halted or killed run resumes exactly where the ledger says;
* a download failure never leads to a new generation (GENERATED only moves on
  to COMPLETE or FAILED).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ..client import DiffioClient
from ..clock import Clock, SystemClock, WallTime
from ..errors import BatcherError
from ..intake import Intake, intake_batches
from ..ledger.base import Ledger
from ..ledger.patient import patient
from ..model import ACTIVE_STAGES, Kind, LedgerRow, RunInfo, Stage, status_counts
from ..ops.logs import LEDGER_ROWS_RETIRED, event
from ..ratelimit import Gate
from ..retry import RetryPolicy
from ..settings import Settings
from .context import HaltState, RunContext
from .download import Downloader
from .followers import regroup_followers, settle_followers
from .hosts import Shared, membership_for
from .poll import Polling
from .resume import Resume
from .stats import RunStats
from .submit import Submitter
from .webhooks import EventFeed, SafetyNet

__all__ = ["RunResult", "Runner"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Download workers, at most (the concurrency cap bounds them too).
DOWNLOAD_WORKERS = 8


@dataclass(slots=True)
class RunResult:
    """What ``batcher run`` reports when it ends."""

    exit_code: int
    counts: dict[str, int]
    stats: RunStats
    halted: str | None = None
    halt_error: BatcherError | None = None
    ledger: str = ""
    errors: list[tuple[str, str, int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Plain values (the Python API and --report)."""
        return {
            "exitCode": self.exit_code,
            "counts": dict(self.counts),
            "halted": self.halted,
            "ledger": self.ledger,
            "topErrors": [
                {"code": c, "message": m, "count": n} for c, m, n in self.errors
            ],
            **self.stats.snapshot(),
        }


class Runner:
    """Runs one job over one ledger with one client. See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        client: DiffioClient,
        *,
        gate: Gate,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        policy: RetryPolicy | None = None,
        stats: RunStats | None = None,
        wall: WallTime = time.time,
        run_info: RunInfo | None = None,
        webhooks: bool = False,
    ) -> None:
        clock = clock or SystemClock()
        # The ledger's outages are waited out, up to the patience (exit 3 after).
        ledger = patient(ledger, clock=clock, patience=settings.outage_patience)
        self.settings = settings
        self.ledger = ledger
        halts = HaltState()
        run_info = run_info or RunInfo.start()
        membership = membership_for(ledger, lambda leasing: Shared(
            leasing, settings=settings, clock=clock, run_info=run_info,
            stopping=lambda: halts.error is not None, stopped=lambda: halts.hard))
        self.ctx = RunContext(
            settings=settings, ledger=ledger, client=client, gate=gate, clock=clock,
            rng=rng or random.Random(),
            policy=policy or RetryPolicy(max_attempts=settings.max_attempts),
            stats=stats or RunStats(), membership=membership, halts=halts, wall=wall)
        self.stats = self.ctx.stats
        self.membership = membership
        self.resume = Resume(self.ctx)
        self.downloader = Downloader(self.ctx)
        self.polling = Polling(self.ctx, self._send_download)
        self.submitter = Submitter(self.ctx, self.polling)
        # With webhooks: events from the ledger move rows, polls are a safety net.
        self.feed: EventFeed | None = None
        if webhooks:
            self.stats.webhooks_on = True
            net = SafetyNet(settings.poll_interval, settings.webhook_poll_ceiling)
            self.polling.policy = net
            self.feed = EventFeed(self.ctx, self.polling, net)
        self._submit_send: MemoryObjectSendStream[LedgerRow] | None = None
        self._download_send: MemoryObjectSendStream[LedgerRow] | None = None

    async def run(self) -> RunResult:
        """Run the job to its end (or a halt) and return the result."""
        with anyio.CancelScope() as scope:
            self.ctx.scope = scope
            await self.submitter.count_earlier_spend()
            if self.feed is not None:
                await self.feed.catch_up()
            async with self.membership.joined():
                await self._stages()
        if not self.ctx.halts.hard:
            await settle_followers(self.ctx)
        return await self._result()

    async def _stages(self) -> None:
        n = self.settings.concurrency
        async with anyio.create_task_group() as downloads:
            dl_send, dl_recv = anyio.create_memory_object_stream[LedgerRow](n * 4)
            self._download_send = dl_send
            for _ in range(min(n, DOWNLOAD_WORKERS)):
                downloads.start_soon(self.downloader.worker, dl_recv.clone())
            dl_recv.close()
            async with dl_send, anyio.create_task_group() as polling:
                polling.start_soon(self._poll)
                sub_send, sub_recv = anyio.create_memory_object_stream[LedgerRow](n * 2)
                async with anyio.create_task_group() as submits:
                    for _ in range(n):
                        submits.start_soon(self.submitter.worker, sub_recv.clone())
                    sub_recv.close()
                    async with sub_send:
                        self._submit_send = sub_send
                        await self._import()
                self.polling.poller.close()

    async def _poll(self) -> None:
        """The poller, and with webhooks the event feed beside it, until both are done."""
        if self.feed is None:
            await self.polling.poller.run()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.feed.run)
            await self.polling.poller.run()
            self.feed.close()

    async def _import(self) -> None:
        """Import the manifest into the ledger; the membership decides what goes to work."""
        async for batch in intake_batches(Intake.of(self.settings)):
            self.stats.rows_total += len(batch)
            current = await self.ledger.import_rows(batch)
            for new, row in zip(batch, current, strict=True):
                if self.ctx.halts.hard:
                    return
                prepared = await self.resume.prepare(new, row)
                if prepared is not None:
                    await self.membership.imported(prepared, self._dispatch)
        retired = await self.ledger.finish_import()
        if retired:
            log.info("%d rows of the ledger are no longer in the manifest (retired)", retired,
                     extra=event(LEDGER_ROWS_RETIRED, rows=retired))
        if not self.ctx.halts.hard:
            await self._regroup()
        await self.membership.work(self._dispatch)

    async def _regroup(self) -> None:
        """Once the whole manifest is known: followers whose leader left lead or follow anew."""
        for row_id in self.resume.taken_over():
            row = await self.ledger.get(row_id)
            if (row is not None and not row.retired and row.leader_row_id is None
                    and row.stage in ACTIVE_STAGES):
                await self.membership.imported(row, self._dispatch)
        for row in await regroup_followers(self.ctx):
            await self.membership.imported(row, self._dispatch)

    async def _dispatch(self, row: LedgerRow) -> None:
        """Hand an active row to the stage that goes on with it."""
        if row.stage in (Stage.PENDING, Stage.PROJECT_CREATED, Stage.UPLOADED):
            if self.ctx.halted:
                self.membership.release(row.row_id)
                return
            self.stats.in_flight += 1
            if row.kind is Kind.FILE and row.stage is not Stage.UPLOADED:
                self.stats.upload_bytes += row.source_size or 0
            assert self._submit_send is not None
            await _put(self._submit_send, row)
        elif row.stage is Stage.SUBMITTED:
            self.stats.in_flight += 1
            self.polling.watch(row, resumed=True)
        elif row.stage is Stage.GENERATED:
            self.stats.in_flight += 1
            await self._send_download(row)
        else:
            self.membership.release(row.row_id)

    async def _send_download(self, row: LedgerRow) -> None:
        assert self._download_send is not None
        await _put(self._download_send, row)

    async def _result(self) -> RunResult:
        counts = status_counts(await self.ledger.counts())
        errors = await self.ledger.error_summary(5)
        halt_error = self.ctx.halts.error
        if halt_error is not None:
            code = 3
        elif counts["failed"] or counts["pending"] or counts["submitted"]:
            code = 1
        else:
            code = 0
        return RunResult(
            exit_code=code,
            counts=counts,
            stats=self.stats,
            halted=self.stats.halted,
            halt_error=halt_error,
            ledger=self.ledger.description,
            errors=errors,
        )


async def _put(send: MemoryObjectSendStream[T], item: T) -> None:
    """Send without first yielding to the loop when the buffer has room.

    ``send`` always checkpoints; on the hot path that is one extra event-loop
    round per row. Cancellation still lands at the next real wait.
    """
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)

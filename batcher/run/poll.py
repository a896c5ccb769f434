"""Polling: one heap of due times for every submitted generation, and what
each answer means for its row.

Never a sleeping task per generation (10^5 rows in flight would mean 10^5
tasks): one scheduler task pops what is due and hands it to a few poll
workers; the rate gate inside the client paces the actual requests.

The first poll waits ``--poll-interval`` (or longer once the run has learned
how long generations take, so most rows are polled once). A poll that finds
a generation running reads its progress: :mod:`.predict` turns readings into
a predicted end, and the next poll is aimed just past it (the waits already
scheduled are revised when the prediction first appears or moves). Without
a prediction, later polls back off by x1.5 with jitter, capped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..answers import GenerationStatus, Progress
from ..clock import Clock
from ..errors import ApiError, TransitionConflict
from ..model import Kind, LedgerRow, Stage, Update
from ..ops.logs import (
    POLL_RETRY_SCHEDULED,
    POLL_UNKNOWN_STATUS,
    ROW_MOVED_ELSEWHERE,
    event,
)
from ..retry import RetryPolicy
from .context import RunContext
from .delays import DelayModel  # re-exported: the poller's wait model
from .predict import Reading

__all__ = ["DelayModel", "PollItem", "PollPolicy", "Poller", "Polling", "progress_reading"]

log = logging.getLogger(__name__)

# After this many polls answering a status we do not know, the row fails
# instead of being polled forever.
UNKNOWN_STATUS_LIMIT = 10


@dataclass(slots=True)
class PollItem:
    """A generation the runner waits on."""

    row_id: str
    generation_id: str
    api_project_id: str | None
    submitted_at: float  # monotonic; when it was accepted (or resumed)
    polls: int = 0
    delay: float = 0.0  # the last wait used
    unknown_statuses: int = 0
    errors: int = 0  # consecutive failed polls
    # The row as this run last wrote it: the next write is a compare-and-set
    # from it, so no read is needed per poll.
    row: LedgerRow | None = None
    resumed: bool = False
    # The API status and queue position last written to the ledger: a
    # change is written, a repeat is not.
    status: str | None = None
    queue: int | None = None
    # The last two progress readings of the running generation (not resumed).
    reading: Reading | None = None
    previous: Reading | None = None
    scout: bool = False  # read again soon on purpose (see DelayModel.next)
    scouted: int = 0  # polls made soon on purpose
    # Its first poll was aimed by what was learned of durations (not the
    # plain --poll-interval): its first reading is no fair sample of them.
    aimed: bool = False
    # Its first reading is still to be taken as a sample of durations (True),
    # was taken or never will be (False), or is awaited from a generation
    # its first poll found running but unread (None).
    sample: bool | None = True
    # Settled elsewhere (a webhook event moved the row): never polled again.
    settled: bool = False
    queued: bool = False  # on the poller's heap now

    def read(self, reading: Reading) -> None:
        """Keep a progress reading (the one before it stays, for the speed)."""
        if self.reading is None or reading.after(self.reading):
            self.previous, self.reading = self.reading, reading


def progress_reading(progress: Progress, elapsed: float) -> Reading | None:
    """What a running generation's answer says about how far it got, if anything.

    The inference stage's progress between 0 and 100 %; before inference
    (0 % or absent), the pre-processing stage's, when the answer carries
    stage progress (the seed-era API does not). 0 % of a stage says only
    that it has not begun, not when it will; 100 % only that it ended,
    not when: no reading.
    """
    if progress.progress is not None and 0 < progress.progress < 100:
        return Reading(elapsed, progress.progress / 100.0)
    if progress.progress and progress.progress >= 100:
        return None
    stages = progress.stage_progress or {}
    pre = stages.get("preProcessing")
    if pre is not None and 0 < pre < 100 and not stages.get("inference"):
        return Reading(elapsed, pre / 100.0, pre=True)
    return None


class PollPolicy(Protocol):
    """Decides when watched generations are polled, when something else reports them.

    With webhooks on, events report most generations, and polls are only a
    safety net (:mod:`batcher.run.webhooks`); without one the poller keeps
    its own waits.
    """

    def watch(self, item: PollItem, *, resumed: bool) -> float | None:
        """``item`` is watched from now: the wait before its first poll (None: the default)."""

    def forget(self, item: PollItem) -> None:
        """``item`` needs no more polling (its row was moved on)."""


class Poller:
    """Schedules ``check(item)`` calls at due times until closed and empty.

    ``check`` returns True when the item is finished (the runner has recorded
    the outcome) and False to poll again later.
    """

    def __init__(
        self,
        check: Callable[[PollItem], Awaitable[bool]],
        delays: DelayModel,
        *,
        clock: Clock,
        workers: int = 8,
    ) -> None:
        self._check = check
        self.delays = delays
        self._clock = clock
        self._workers = max(1, workers)
        self._heap: list[tuple[float, int, PollItem]] = []
        self._seq = itertools.count()
        self._nap: anyio.CancelScope | None = None
        self._closed = False
        self._inflight = 0
        self._live = 0  # items on the heap that are not settled

    def __len__(self) -> int:
        return self._live + self._inflight

    def _push(self, due: float, item: PollItem) -> None:
        if item.settled:  # settled before it was ever due: nothing to schedule
            return
        heapq.heappush(self._heap, (due, next(self._seq), item))
        item.queued = True
        self._live += 1

    def settle(self, item: PollItem) -> None:
        """Never poll ``item`` again (it is skipped when due, and no longer counted)."""
        if item.settled:
            return
        item.settled = True
        if item.queued:
            self._live -= 1
            self._wake()

    def add(self, item: PollItem, *, due_in: float | None = None) -> None:
        """Schedule ``item``; by default after the first-poll wait."""
        now = self._clock.now()
        due = None
        if due_in is None:
            wait = self.delays.first()
            item.aimed = self.delays.aimed_first() is not None
            if item.aimed:
                # Aimed at an elapsed time: counted from the acceptance.
                due = max(now, item.submitted_at + wait)
        else:
            wait = due_in
        item.delay = wait
        self._push(now + wait if due is None else due, item)
        if self._heap and self._heap[0][2] is item:
            self._wake()

    def close(self) -> None:
        """No more items will be added; ``run`` returns once the heap drains."""
        self._closed = True
        self._wake()

    async def run(self) -> None:
        """Poll until closed and nothing is left."""
        send, recv = anyio.create_memory_object_stream[PollItem](0)
        async with anyio.create_task_group() as tg:
            for _ in range(self._workers):
                tg.start_soon(self._worker, recv.clone())
            recv.close()
            async with send:
                while True:
                    if not self._live:
                        if self._closed and self._inflight == 0:
                            return
                        await self._sleep(None)
                        continue
                    due = self._heap[0][0]
                    wait = due - self._clock.now()
                    if wait > 0:
                        await self._sleep(wait)
                        continue
                    _, _, item = heapq.heappop(self._heap)
                    item.queued = False
                    if item.settled:
                        continue
                    self._live -= 1
                    self._inflight += 1
                    try:  # no extra loop round when a worker is already waiting
                        send.send_nowait(item)
                    except anyio.WouldBlock:
                        await send.send(item)

    def _revise(self) -> None:
        """Re-aim every scheduled poll at its predicted end (one pass, one heapify)."""
        now = self._clock.now()
        heap = self._heap
        for i, (_due, seq, item) in enumerate(heap):
            if item.resumed or item.settled or (item.scout and item.previous is None):
                continue
            target = self.delays.predicted(item)
            if target is not None:
                heap[i] = (max(now, item.submitted_at + target), seq, item)
                item.aimed = True
        heapq.heapify(heap)
        self._wake()

    def _wake(self) -> None:
        if self._nap is not None:
            self._nap.cancel()

    async def _sleep(self, seconds: float | None) -> None:
        """Sleep until ``seconds`` pass (None: forever) or :meth:`_wake`."""
        with anyio.CancelScope() as nap:
            self._nap = nap
            if seconds is None:
                await anyio.sleep_forever()
            else:
                await self._clock.sleep(seconds)
        self._nap = None

    async def _worker(self, recv: MemoryObjectReceiveStream[PollItem]) -> None:
        async with recv:
            async for item in recv:
                try:
                    item.polls += 1
                    finished = await self._check(item)
                    if not finished and not item.settled:
                        now = self._clock.now()
                        wait = self.delays.next(item, now)
                        item.delay = wait
                        self._push(now + wait, item)
                    if self.delays.needs_revision():
                        self._revise()
                finally:
                    self._inflight -= 1
                    self._wake()


class Polling:
    """The poll stage: watches submitted generations and acts on their status.

    ``to_download`` takes a file row whose generation is complete.
    """

    def __init__(self, ctx: RunContext, to_download: Callable[[LedgerRow], Awaitable[None]]
                 ) -> None:
        self.ctx = ctx
        self._to_download = to_download
        settings = ctx.settings
        # A generation is polled again after a retryable failure, twice as
        # often as other requests are retried; the poller decides when.
        self._retry = RetryPolicy(max_attempts=2 * settings.max_attempts,
                                  rate_limited_attempts=2 * settings.max_attempts, waits=False)
        # With webhooks: when to poll, and who else reports generations.
        self.policy: PollPolicy | None = None
        self.poller = Poller(
            self._check_watched,
            DelayModel(settings.poll_interval, rng=ctx.rng),
            clock=ctx.clock,
            workers=max(2, settings.concurrency),
        )

    def watch(self, row: LedgerRow, *, resumed: bool, accepted_at: float | None = None) -> None:
        """Poll the row's generation (at once when resumed from the ledger).

        ``accepted_at``: when the API accepted it (halfway through the post),
        if known; elapsed times are counted from then, not from now (the
        ledger write in between is no generation time).
        """
        assert row.generation_id is not None
        now = self.ctx.clock.now()
        start = now if accepted_at is None or not accepted_at <= now else accepted_at
        item = PollItem(row.row_id, row.generation_id, row.api_project_id,
                        submitted_at=start, resumed=resumed, row=row,
                        status=row.api_status, queue=row.queue_position)
        due_in = 0.0 if resumed else None
        if self.policy is not None:
            due_in = self.policy.watch(item, resumed=resumed)
        self.poller.add(item, due_in=due_in)

    async def _check_watched(self, item: PollItem) -> bool:
        finished = await self._check(item)
        if finished and item.sample is None:
            item.sample = False  # ended before any reading: no sample
            self.poller.delays.predictor.unread(-1)
        if finished and self.policy is not None:
            self.policy.forget(item)
        return finished

    async def _check(self, item: PollItem) -> bool:
        ctx = self.ctx
        ctx.stats.polls += 1
        ctx.count_poll(item.row_id)
        ctx.count_attempt(item.row_id)
        progress: Progress | ApiError
        try:
            progress = await ctx.client.get_progress(
                generation_id=item.generation_id, api_project_id=item.api_project_id)
        except ApiError as err:
            progress = err
        # With a poll policy (webhooks), polls are a safety net on its own
        # schedule: nothing is predicted, so nothing re-aims its polls.
        if (not isinstance(progress, ApiError) and not item.resumed and self.policy is None
                and progress.status is GenerationStatus.RUNNING):
            now = ctx.clock.now()
            # When the answer was most likely made, not when it arrived.
            at = progress.read_at
            at = now if at is None or not item.submitted_at <= at <= now else at
            self._read(item, progress_reading(progress, at - item.submitted_at))
        assert item.row is not None
        try:
            if isinstance(progress, ApiError):
                return await self._poll_failure(item, progress)
            return await self.after_status(item.row, progress.status, progress.api_status,
                                           error=progress.error,
                                           details=progress.error_details, poll=item,
                                           queue=progress.queue_position)
        except TransitionConflict:
            # Another host (or a follower settle) moved the row on: not ours now.
            log.info("row %s was moved on elsewhere; polling it stops", item.row_id,
                     extra=event(ROW_MOVED_ELSEWHERE, row=item.row_id, step="poll"))
            ctx.drop(item.row_id)
            return True

    def _read(self, item: PollItem, reading: Reading | None) -> None:
        """What a poll that found the generation running tells the predictor."""
        predictor = self.poller.delays.predictor
        if reading is None:
            if item.sample is True and item.polls == 1 and not item.aimed:
                item.sample = None  # running, but said nothing yet: counted as unread
                predictor.unread(1)
            return
        item.read(reading)
        predictor.observe(reading)
        if not item.aimed and item.sample is not False:
            # The first reading of a row polled first at the plain interval,
            # whichever poll it came at: a sample of durations.
            predictor.observe_first(reading, unread=item.sample is None)
            item.sample = False
        if item.previous is not None and item.reading is reading:
            predictor.observe_pair(item.previous, reading)

    async def _poll_failure(self, item: PollItem, err: ApiError) -> bool:
        """A poll failed: halt, poll again later (the poller's wait), or fail the row."""
        ctx = self.ctx
        if err.halts_run:
            ctx.halt(err)
            ctx.cancel()
            return True
        item.errors += 1
        # During a suspected outage a poll failure is no verdict on the
        # generation: it is polled again, and the breaker bounds the wait.
        if (ctx.outage_suspected(err)
                or self._retry.decide(err, item.errors, ctx.rng) is not None):
            log.info("poll of row %s failed, polling again later: %s", item.row_id, err,
                     extra=event(POLL_RETRY_SCHEDULED, row=item.row_id, code=err.code))
            return False
        row = await ctx.ledger.get(item.row_id)
        if row is not None and row.stage is Stage.SUBMITTED:
            await ctx.fail(row, err.to_record())
        return True

    def finished(self, row_id: str) -> None:
        """A row's generation is complete and recorded (not a file row: nothing to fetch)."""
        stats = self.ctx.stats
        stats.queue.pop(row_id, None)
        stats.done += 1
        stats.in_flight -= 1

    async def after_status(
        self,
        row: LedgerRow,
        status: GenerationStatus,
        api_status: str,
        *,
        error: str | None = None,
        details: str | None = None,
        poll: PollItem | None,
        queue: int | None = None,
        accepted_at: float | None = None,
    ) -> bool:
        """Act on a generation's status; True when the row needs no more polling.

        ``api_status`` is the word the API sent, written to the ledger, with
        ``queue``, the generation's place in the API's queue while it waits
        (1 is next; None once out of it).
        """
        ctx = self.ctx
        if status is not GenerationStatus.RUNNING or queue is None:
            ctx.stats.queue.pop(row.row_id, None)
        else:
            ctx.stats.queue[row.row_id] = queue
        if status is GenerationStatus.COMPLETE:
            # Only a generation seen unfinished before says how long one takes:
            # one done at its first poll only bounds it by the wait we chose
            # (plus queueing), and learning that bound ratchets the wait up.
            if poll is not None and not poll.resumed and poll.polls > 1:
                self.poller.delays.observe(ctx.clock.now() - poll.submitted_at)
            done: Update = {"api_status": api_status}
            if row.queue_position is not None:
                done["queue_position"] = None
            if row.kind is Kind.FILE:
                row = await ctx.move(row, Stage.GENERATED, done, "generated")
                await self._to_download(row)
            else:
                await ctx.move(row, Stage.COMPLETE, done, "complete")
                self.finished(row.row_id)
            return True
        if status is GenerationStatus.FAILED:
            message = error or details or "the generation failed at the API"
            if details and error and details != error:
                message = f"{error}: {details}"
            await ctx.fail(row, {"code": "generationFailed", "message": message,
                                 "httpStatus": None}, api_status=api_status)
            return True
        if status is GenerationStatus.UNKNOWN:
            count = 1 if poll is None else poll.unknown_statuses + 1
            if poll is not None:
                poll.unknown_statuses = count
            log.warning("row %s: the API answered status %r, which batcher does not know",
                        row.row_id, api_status,
                        extra=event(POLL_UNKNOWN_STATUS, row=row.row_id, status=api_status))
            if count >= UNKNOWN_STATUS_LIMIT:
                await ctx.fail(row, {"code": "unknownStatus", "httpStatus": None,
                                     "message": f"the API kept answering status "
                                     f"{api_status!r}, which batcher does not know"},
                               api_status=api_status)
                return True
        if poll is None:
            self.watch(row, resumed=False, accepted_at=accepted_at)
            return True
        if api_status != poll.status or queue != poll.queue:
            poll.status, poll.queue = api_status, queue
            poll.row = await ctx.move(row, Stage.SUBMITTED, {
                "api_status": api_status, "queue_position": queue}, "progress",
                {"queue": queue} if queue is not None else None)
        return False

"""One poller for every submitted generation: a heap of due times.

Never a sleeping task per generation (10^5 rows in flight would mean 10^5
tasks): one scheduler task pops what is due and hands it to a few poll
workers; the rate gate inside the client paces the actual requests.

The first poll waits ``--poll-interval`` (or longer once the run has learned
how long generations take, so most rows are polled once); later polls back
off by x1.5 with jitter, capped.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .model import LedgerRow

__all__ = ["DelayModel", "PollItem", "Poller"]


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
    extra: dict[str, object] = field(default_factory=dict)


class DelayModel:
    """Decides waits between polls and learns from completed generations.

    Kept apart from the scheduler so the policy is a pure, testable function
    of what was observed.
    """

    def __init__(
        self,
        poll_interval: float,
        *,
        cap: float = 60.0,
        growth: float = 1.5,
        rng: random.Random | None = None,
        quantile: float = 0.9,
        min_samples: int = 5,
    ) -> None:
        self.poll_interval = poll_interval
        self.cap = max(cap, poll_interval)
        self.growth = growth
        self.quantile = quantile
        self.min_samples = min_samples
        self._rng = rng or random.Random()
        self._samples: deque[float] = deque(maxlen=256)

    def observe(self, seconds: float) -> None:
        """A generation took ``seconds`` from acceptance to observed completion."""
        if seconds >= 0 and math.isfinite(seconds):
            self._samples.append(seconds)

    def learned(self) -> float | None:
        """The duration most generations finish within, once enough were seen."""
        if len(self._samples) < self.min_samples:
            return None
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, int(self.quantile * len(ordered)))
        return ordered[index]

    def first(self) -> float:
        """Wait before the first poll of a fresh generation."""
        learned = self.learned()
        base = self.poll_interval if learned is None else max(self.poll_interval, learned)
        return min(base, self.cap)

    def next(self, item: PollItem, now: float | None = None) -> float:
        """Wait after a poll that found the generation still running.

        Once durations are learned, aim at the moment most generations are
        done (``submitted_at + learned``); past it, poll at a short floor
        that grows. Before anything is learned, double the wait each time, so
        a run of long generations costs few polls while it learns.
        """
        learned = self.learned()
        if learned is None:
            # Double for the first few polls (long generations cost few polls
            # while the run learns), then grow gently.
            factor = 2.0 if item.polls <= 3 else self.growth
            wait = min(self.cap, max(self.poll_interval, item.delay * factor))
        else:
            floor = max(self.poll_interval * 0.5, 0.15 * learned, 0.05)
            elapsed = 0.0 if now is None else now - item.submitted_at
            remaining = learned - elapsed
            if remaining > floor:
                wait = remaining
            else:
                grown = min(self.cap, max(floor, item.delay * self.growth))
                wait = floor if item.polls <= 1 else grown
        # Jitter keeps thousands of rows submitted together from polling in step.
        return wait * self._rng.uniform(0.9, 1.1)


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
        now: Callable[[], float],
        workers: int = 8,
    ) -> None:
        self._check = check
        self.delays = delays
        self._now = now
        self._workers = max(1, workers)
        self._heap: list[tuple[float, int, PollItem]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._closed = False
        self._inflight = 0

    def __len__(self) -> int:
        return len(self._heap) + self._inflight

    def add(self, item: PollItem, *, due_in: float | None = None) -> None:
        """Schedule ``item``; by default after the first-poll wait."""
        wait = self.delays.first() if due_in is None else due_in
        item.delay = wait
        due = self._now() + wait
        heapq.heappush(self._heap, (due, next(self._seq), item))
        if self._heap[0][2] is item:
            self._wake.set()

    def close(self) -> None:
        """No more items will be added; ``run`` returns once the heap drains."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """Poll until closed and nothing is left."""
        send, recv = anyio.create_memory_object_stream[PollItem](0)
        async with anyio.create_task_group() as tg:
            for _ in range(self._workers):
                tg.start_soon(self._worker, recv.clone())
            recv.close()
            async with send:
                while True:
                    if not self._heap:
                        if self._closed and self._inflight == 0:
                            return
                        await self._sleep(None)
                        continue
                    due = self._heap[0][0]
                    wait = due - self._now()
                    if wait > 0:
                        await self._sleep(wait)
                        continue
                    _, _, item = heapq.heappop(self._heap)
                    self._inflight += 1
                    try:  # no extra loop round when a worker is already waiting
                        send.send_nowait(item)
                    except anyio.WouldBlock:
                        await send.send(item)

    async def _sleep(self, seconds: float | None) -> None:
        self._wake = anyio.Event()
        if seconds is None:
            await self._wake.wait()
        else:
            with anyio.move_on_after(seconds):
                await self._wake.wait()

    async def _worker(self, recv: MemoryObjectReceiveStream[PollItem]) -> None:
        async with recv:
            async for item in recv:
                try:
                    item.polls += 1
                    finished = await self._check(item)
                    if not finished:
                        wait = self.delays.next(item, self._now())
                        item.delay = wait
                        heapq.heappush(
                            self._heap, (self._now() + wait, next(self._seq), item)
                        )
                finally:
                    self._inflight -= 1
                    self._wake.set()

"""One fake clock for every test: time moves only when the test says so.

Like trio's MockClock: :meth:`FakeClock.sleep` parks the caller until
:meth:`FakeClock.advance_to` (or :meth:`FakeClock.advance`) moves time past
its deadline; :func:`settle` returns once every other task is blocked, so a
test can step through a schedule deterministically and fast.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import anyio
import anyio.lowlevel


class FakeClock:
    """A clock that only moves when the test says so (like trio's MockClock)."""

    def __init__(self) -> None:
        self.t = 0.0
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self.t + seconds, next(self._seq), event))
        await event.wait()

    async def advance_to(self, target: float) -> None:
        """Move time to ``target``, waking sleepers in order and letting them run."""
        while True:
            await settle()
            if self._sleepers and self._sleepers[0][0] <= target:
                when, _, event = heapq.heappop(self._sleepers)
                self.t = max(self.t, when)
                event.set()
            else:
                break
        self.t = max(self.t, target)
        await settle()

    async def advance(self, seconds: float) -> None:
        """Move time ``seconds`` forward (see :meth:`advance_to`)."""
        await self.advance_to(self.t + seconds)


async def settle() -> None:
    """Return once every other task is blocked.

    ``anyio.wait_all_tasks_blocked`` does the same but naps 0.1 s per check,
    far too slow for hundreds of fake-clock steps; this yields instead.
    """
    me = asyncio.current_task()
    while True:
        await asyncio.sleep(0)
        for task in asyncio.all_tasks():
            waiter = getattr(task, "_fut_waiter", None)
            if task is not me and (waiter is None or waiter.done()):
                break
        else:
            return

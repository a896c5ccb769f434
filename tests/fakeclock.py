"""The one fake clock of the test suite: time moves only when a test says so.

One object serves every time seam batcher and its simulator have:

* ``clock.now()`` and ``await clock.sleep(s)``: the :class:`batcher.clock.Clock`
  protocol (rate gate, poller, retry waits, runner);
* ``clock()``: a plain time source, for the simulator's ``clock`` and ``wall``
  and the ledgers' timestamps. With ``tick`` set, every such read moves time
  on by ``tick`` first (ledgers that need strictly increasing timestamps);
  reads are thread-safe (SQLite's writer thread reads it).

Time moves by ``advance(s)`` / ``set_time(t)`` (sleepers that come due are
woken, not run), by ``await advance_to(t)`` (sleepers run in due order, each
until every task is blocked again), or by ``autojump()``: a background task
that jumps to the next sleeper's due time whenever every task is blocked, so
a whole run of minutes of fake time takes milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel

__all__ = ["FakeClock", "settle"]


class _Sleeper:
    __slots__ = ("due", "seq", "woken")

    def __init__(self, due: float, seq: int) -> None:
        self.due = due
        self.seq = seq
        self.woken = anyio.Event()

    def __lt__(self, other: _Sleeper) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)


class FakeClock:
    """A settable clock; see the module docstring."""

    def __init__(self, start: float = 0.0, *, tick: float = 0.0) -> None:
        self._t = start
        self.tick = tick
        self._lock = threading.Lock()
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()

    def __repr__(self) -> str:
        return f"FakeClock(t={self._t}, sleepers={len(self._sleepers)})"

    # -- reading ---------------------------------------------------------------

    def now(self) -> float:
        """The current fake time (never moves by itself)."""
        with self._lock:
            return self._t

    def __call__(self) -> float:
        """The current fake time as a time source, moved on by ``tick`` first."""
        with self._lock:
            self._t += self.tick
            return self._t

    # -- waiting ---------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """Wait until fake time reaches now + ``seconds``."""
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper(self.now() + seconds, next(self._seq))
        heapq.heappush(self._sleepers, sleeper)
        try:
            await sleeper.woken.wait()
        finally:
            if not sleeper.woken.is_set():  # cancelled: forget it
                self._sleepers.remove(sleeper)
                heapq.heapify(self._sleepers)

    @property
    def t(self) -> float:
        """The current fake time; setting it is :meth:`set_time`."""
        return self.now()

    @t.setter
    def t(self, value: float) -> None:
        self.set_time(value)

    def next_due(self) -> float | None:
        """When the earliest sleeper wakes, or None when nobody sleeps."""
        return self._sleepers[0].due if self._sleepers else None

    # -- moving ----------------------------------------------------------------

    def set_time(self, t: float) -> None:
        """Jump to ``t`` (never backwards); wake the sleepers that came due."""
        with self._lock:
            self._t = max(self._t, t)
            now = self._t
        while self._sleepers and self._sleepers[0].due <= now:
            heapq.heappop(self._sleepers).woken.set()

    def advance(self, seconds: float) -> None:
        """Move on by ``seconds``; wake the sleepers that came due."""
        self.set_time(self.now() + seconds)

    async def advance_to(self, target: float) -> None:
        """Move to ``target``, running the sleepers due on the way in order."""
        while True:
            await settle()
            due = self.next_due()
            if due is None or due > target:
                break
            self.set_time(due)
        self.set_time(target)
        await settle()

    @asynccontextmanager
    async def autojump(self, grace: float = 0.0005) -> AsyncIterator[None]:
        """While the block runs, jump to the next sleeper whenever all tasks wait.

        ``grace`` (real seconds) lets I/O that is on its way (a loopback HTTP
        answer) arrive before time jumps, so fake time does not race ahead of
        a request in flight more than it must.
        """

        async def jump() -> None:
            while True:
                await settle()
                due = self.next_due()
                if due is None:
                    await asyncio.sleep(grace)
                    continue
                await asyncio.sleep(grace)
                await settle()
                if self.next_due() == due:
                    self.set_time(due)

        async with anyio.create_task_group() as tg:
            tg.start_soon(jump)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()


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

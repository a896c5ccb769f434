"""One rate budget for every API request: submissions and polls share it.

:class:`RateGate` is acquired before each API request, whatever the
endpoint. Its guarantee, on the grant times it hands out:

    in ANY window of ``window`` seconds, at most ``floor(rate * window)``
    acquisitions are granted (``rate`` as last given to the constructor or
    :meth:`RateGate.set_rate`), and the count also holds over the longer
    window ``window * (1 + margin)``.

The margin is the slack left for what happens between the grant and the
server's own clock (connection hand-off, event-loop lag, network jitter): a
request may reach the server up to ``window * margin`` seconds "later" than
its neighbours without the server ever counting more than ``rate`` in one of
its windows.

Two rules give it, both checked on the moment of the grant (real time read
from the clock after waking, so a late wake-up is never hidden):

1. pacing — grants follow a schedule spaced ``(1 + margin) / current_rate``
   apart (no burst at start: a fresh bucket does not hold ``rate`` tokens);
   a grant that is a little late (timer granularity) keeps the schedule, a
   long idle restarts it;
2. a sliding log — the grant ``floor(rate * window)`` places back must be at
   least ``window * (1 + margin)`` old. This makes the guarantee exact even
   when pacing catches up after a late wake-up, and makes a lower
   :meth:`RateGate.set_rate` hold at once.

Why not ``aiolimiter.AsyncLimiter(1, 1/rate)`` for pacing: it reads time from
the event loop, not from an injectable clock; its rate cannot be changed
while callers wait (the AIMD below changes it on every 429); and its
acquire may loop through several wake-ups. The gate here is a FIFO where only
the head waiter sleeps: one sleep per acquire, O(1) work per grant, no
background task and no busy loop.

429s (AIMD): :meth:`RateGate.on_rate_limited` pauses every caller until
``now + retry_after`` and halves the current rate (not below ``min_rate``);
from the end of the pause the rate grows back by ``recovery`` requests/s
every second until it reaches the configured rate.

Concurrency is not this module's business: the runner hands one
``anyio.CapacityLimiter(concurrency)`` to the client, which holds it around
each request (``--concurrency``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Protocol

import anyio

from batcher.clock import Clock
from batcher.ops.logs import RATE_LIMITED, event

__all__ = ["Gate", "RateGate"]

log = logging.getLogger(__name__)

# A grant this late (or less) keeps the pacing schedule instead of restarting
# it: covers timer granularity (epoll rounds sleeps up to 1 ms), the hand-off
# between waiters and the event loop's waits for the GIL (up to the 5 ms
# switch interval while the ledger's writer thread runs), so high rates are
# not lost to lag: at --rate 1000 the run's wall time is 1 % shorter than
# with 5 ms. What is caught up comes as a short burst; the sliding log still
# bounds every window exactly.
_CATCH_UP = 0.025


class Gate(Protocol):
    """What the client and the runner ask of a rate gate.

    :class:`RateGate` keeps one process under ``--rate``;
    :class:`batcher.ratelimit_shared.SharedRateGate` keeps all hosts of a
    shared ledger under it together (see
    :func:`batcher.ratelimit_shared.gate_for`).
    """

    @property
    def clock(self) -> Clock:
        """The clock the gate reads."""
        ...

    @property
    def rate(self) -> float:
        """The configured rate, per :attr:`window`."""
        ...

    @property
    def granted(self) -> int:
        """Acquisitions granted so far (by this process)."""
        ...

    @property
    def current_rate(self) -> float:
        """The rate in force now (less than :attr:`rate` after a 429)."""
        ...

    def paused_for(self) -> float:
        """Seconds left of the pause after the last 429."""
        ...

    async def acquire(self, *, urgent: bool = False) -> None:
        """Wait until one more API request may be sent, and count it.

        ``urgent`` (a poll of a generation already paid for) may go ahead of
        queued submissions; a gate may also serve everyone in order.
        """
        ...

    def on_rate_limited(self, retry_after: float | None = None) -> None:
        """A 429 was heard: pause and slow down."""
        ...

    def set_rate(self, rate: float) -> None:
        """Change the configured rate."""
        ...


class _Waiter:
    __slots__ = ("turn", "urgent")

    def __init__(self, urgent: bool) -> None:
        # Set when this waiter reaches the head of the queue.
        self.turn = anyio.Event()
        self.urgent = urgent


class RateGate:
    """Rate limiter for all API requests together, with 429 back-off.

    ``rate``: most grants per ``window`` seconds (the ``--rate`` flag, per
    second by default). ``margin``: extra fraction of the window kept free,
    see the module docstring. ``default_pause``: pause after a 429 without a
    usable ``Retry-After``; ``max_pause`` bounds any pause. ``min_rate``:
    floor of the multiplicative cut (default ``max(rate/50, min(1, rate))``);
    ``recovery``: additive recovery in requests/s per second (default
    ``rate/20``: from half to full in ten seconds).
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Clock,
        window: float = 1.0,
        margin: float = 0.03,  # 30 ms of jitter per window, for 3 % of throughput
        default_pause: float = 1.0,
        max_pause: float = 60.0,
        min_rate: float | None = None,
        recovery: float | None = None,
    ) -> None:
        if window <= 0 or margin < 0 or default_pause < 0 or max_pause < 0:
            raise ValueError("window must be positive; margin and pauses not negative")
        self._clock = clock
        self._window = window
        self._margin = margin
        self._default_pause = default_pause
        self._max_pause = max_pause
        self._min_rate_arg = min_rate
        self._recovery_arg = recovery
        self._waiters: deque[_Waiter] = deque()
        self._next_at = -math.inf  # pacing schedule: earliest next grant
        self._paused_until = -math.inf
        self._last_cut = -math.inf
        self._granted = 0
        # AIMD state: the rate is _cut_rate at _recover_from, growing after it.
        self._cut_rate = rate
        self._recover_from = -math.inf
        self._max_rate = rate
        self._log: deque[float] = deque()
        self._configure(rate)
        self._cut_rate = rate

    def _configure(self, rate: float) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        self._max_rate = rate
        self._min_rate = (
            self._min_rate_arg
            if self._min_rate_arg is not None
            else max(rate / 50, min(1.0, rate))
        )
        self._min_rate = min(self._min_rate, rate)
        self._recovery = self._recovery_arg if self._recovery_arg is not None else rate / 20
        # How many grants one window may hold; at least one, or nothing
        # would ever pass at rates under one per window (pacing still keeps
        # those to the rate).
        self._limit = max(1, math.floor(rate * self._window + 1e-9))
        self._log = deque(self._log, maxlen=self._limit)

    # -- queries ---------------------------------------------------------

    @property
    def clock(self) -> Clock:
        """The clock this gate reads."""
        return self._clock

    @property
    def rate(self) -> float:
        """The configured rate (the ceiling the AIMD recovers to)."""
        return self._max_rate

    @property
    def window(self) -> float:
        """The window, in seconds, over which ``rate`` is counted."""
        return self._window

    @property
    def granted(self) -> int:
        """Acquisitions granted so far."""
        return self._granted

    @property
    def current_rate(self) -> float:
        """The rate in force now: the configured one, or less after a 429."""
        return self._rate_at(self._clock.now())

    def paused_for(self) -> float:
        """Seconds left of the pause caused by the last 429 (0 when none)."""
        return max(0.0, self._paused_until - self._clock.now())

    def has_capacity(self) -> bool:
        """Whether an :meth:`acquire` now would return without waiting."""
        return not self._waiters and self._clock.now() >= self._due()

    def _rate_at(self, now: float) -> float:
        if now <= self._recover_from or self._cut_rate >= self._max_rate:
            return min(self._cut_rate, self._max_rate)
        grown = self._cut_rate + self._recovery * (now - self._recover_from)
        return min(self._max_rate, grown)

    def _due(self) -> float:
        """Earliest moment the next grant may happen."""
        due = max(self._next_at, self._paused_until)
        if len(self._log) == self._limit:
            due = max(due, self._log[0] + self._window * (1 + self._margin))
        return due

    # -- acquiring ---------------------------------------------------------

    async def acquire(self, *, urgent: bool = False) -> None:
        """Wait until one more API request may be sent, and count it.

        Callers are served first come, first served, except that an
        ``urgent`` one (a poll of a generation already paid for) goes ahead
        of the waiting callers that are not (new submissions): a finished
        generation is noticed when it finishes, not after the submissions
        queued meanwhile, and the rate is the same. Cancelling a waiting
        caller is safe: it leaves the queue and the next caller moves up.
        """
        clock = self._clock
        if not self._waiters and clock.now() >= self._due():
            self._grant(clock.now())
            return
        me = _Waiter(urgent)
        waiters = self._waiters
        if urgent and waiters:
            # Behind the head (it may be asleep until its due time) and the
            # urgent callers already waiting; ahead of everyone else.
            at = 1
            while at < len(waiters) and waiters[at].urgent:
                at += 1
            waiters.insert(at, me)
        else:
            waiters.append(me)
        try:
            if self._waiters[0] is not me:
                await me.turn.wait()
            # Head of the queue: the only waiter that sleeps. The loop runs
            # more than once only if a 429 or set_rate moved the due time
            # while it slept (or the timer woke a hair early).
            while True:
                now = clock.now()
                due = self._due()
                if now >= due:
                    break
                await clock.sleep(due - now)
            self._grant(clock.now())
        finally:
            if self._waiters and self._waiters[0] is me:
                self._waiters.popleft()
                if self._waiters:
                    self._waiters[0].turn.set()
            else:
                self._waiters.remove(me)

    def _grant(self, now: float) -> None:
        spacing = (1 + self._margin) / self._rate_at(now)
        # Late by a hair: keep the schedule (the next grant comes a bit
        # sooner); late by more, or idle: restart the schedule from now.
        start = self._next_at if now - self._next_at <= _CATCH_UP else now
        self._next_at = start + spacing
        self._log.append(now)
        self._granted += 1

    # -- adapting ------------------------------------------------------------

    def on_rate_limited(self, retry_after: float | None = None) -> None:
        """Record a 429: pause every caller, then continue at a cut rate.

        The pause lasts ``retry_after`` seconds (``default_pause`` when the
        server gave none; at most ``max_pause``). The rate is halved at most
        once per window and not again before the previous pause ended: the
        429s of requests already in flight answer the same overload.
        """
        now = self._clock.now()
        pause = self._default_pause if retry_after is None else retry_after
        pause = min(max(pause, 0.0), self._max_pause)
        self._paused_until = max(self._paused_until, now + pause)
        if now >= self._recover_from and now >= self._last_cut + self._window:
            current = self._rate_at(now)
            self._cut_rate = max(self._min_rate, current / 2)
            self._last_cut = now
            log.warning(
                "429 from the API: every request waits %.1f s, then the rate is %.2f req/s",
                pause, self._cut_rate,
                extra=event(RATE_LIMITED, retry_after=retry_after, pause=pause,
                            rate=self._cut_rate),
            )
        else:
            self._cut_rate = self._rate_at(now)
        self._recover_from = self._paused_until

    def set_rate(self, rate: float) -> None:
        """Change the configured rate (e.g. a share of a multi-host budget).

        A lower rate holds at once, for the sliding-window guarantee too; a
        higher one is reached at once unless the gate is recovering from a
        429, in which case the recovery continues up to it.
        """
        now = self._clock.now()
        current = self._rate_at(now)
        recovering = current < self._max_rate
        self._configure(rate)
        self._cut_rate = min(current, rate) if recovering else rate
        self._recover_from = max(self._recover_from, now) if recovering else -math.inf

    def __repr__(self) -> str:
        now = self._clock.now()
        state = (
            f"rate {self._rate_at(now):g}/{self._max_rate:g} per {self._window:g}s, "
            f"margin {self._margin:g}, granted {self._granted}, waiting {len(self._waiters)}"
        )
        if self._paused_until > now:
            state += f", paused for {self._paused_until - now:.3f}s"
        due = self._due()
        if due > now:
            state += f", next in {due - now:.4f}s"
        return f"<RateGate [{state}]>"

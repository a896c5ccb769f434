"""One rate budget for several hosts: the rate gate of a shared ledger.

:class:`~batcher.ratelimit.RateGate` keeps one process under ``--rate``. Hosts
sharing a job on a PostgreSQL ledger must keep their *sum* under it, over any
one-second window, also when there are more hosts than requests per second.
Splitting the rate by the number of live hosts cannot do that (three hosts at
``--rate 1`` would each allow themselves one request per three seconds, yet
may all send in the same second). :class:`SharedRateGate` does not split:

* **One schedule.** The ledger keeps the job's send slots on its own clock
  (:meth:`~batcher.ledger.base.LeasingLedger.claim_slots`): slot after slot,
  ``(1 + margin) / rate`` seconds apart, whoever claims them. A host claims a
  small block of upcoming slots at a time, atomically, so no two hosts ever
  hold the same slot.
* **Sent at the slot's time.** The gate maps ledger time to its own
  monotonic clock with an offset measured on every claim (the ledger's time
  against the midpoint of the round trip, from the fastest recent claim), and
  grants each acquisition at a slot's time, never before it.
* **A late slot is wasted, not used.** Sending late would bring a request
  closer to the next host's; a slot that cannot be used within
  ``tolerance`` of its time (``margin / 2`` of the window) is dropped. The
  rest of the margin covers the offset's error (half the fastest round trip)
  and the way to the server: keep the ledger within ~20 ms of every host or
  raise ``margin``.
* **Blocks sized by use.** A claim takes as many slots as callers are
  waiting, or as this host used in the last ~0.2 s, whichever is more, but
  never more than ~0.25 s of the job's rate: one ledger round trip per block,
  not per request, and little wasted when a host stops.
* **429s slow every host.** :meth:`SharedRateGate.on_rate_limited` pauses this
  host at once and reports the pause with its next claim; the ledger halves
  the job's rate and holds every host's new slots back until the pause ends,
  then lets the rate grow back as RateGate does. The host that saw the 429
  reports it at once if a caller is waiting (else with its next acquire);
  every other host hears of it with its next claim, so each sends at most
  the one block it already holds (~0.25 s of the rate, at least one request)
  before it pauses too. Nothing is asked of the ledger between claims.

It has RateGate's interface, so the client can take either. ``rate`` here is
the whole job's rate, not a share: never divide it by the number of hosts.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import anyio

from batcher.clock import Clock
from batcher.errors import LedgerError
from batcher.ledger.base import LeasingLedger, Ledger, is_shared
from batcher.ops.logs import RATE_CLAIM_FAILED, RATE_LIMITED, event
from batcher.ratelimit import Gate, RateGate

__all__ = ["SHARED_MARGIN", "SharedRateGate", "gate_for"]

log = logging.getLogger(__name__)

# The margin of a run's shared gate: a tenth of each window kept free, half
# for a grant a little late, half for the way from the grant to the API and
# the error of the clock offset. Hosts are separate machines with separate
# networks and schedulers; a few per cent, enough for one process, is not.
SHARED_MARGIN = 0.1

_OFFSET_SAMPLES = 16  # recent claims whose round trips the offset is chosen from
_FIRST_LEAD = 0.02  # how far ahead the first claim asks for its slots, in seconds
_RETRY_FIRST, _RETRY_MAX = 0.25, 5.0  # waits between failed claims


class SharedRateGate:
    """Rate limiter for all API requests of all hosts of a job together.

    ``ledger``: the shared ledger of the job (its pace and its clock).
    ``rate``: the job's ``--rate``, for all hosts together. ``margin``:
    fraction of each window kept free (half for lateness, half for clock
    offsets and the network). ``block_seconds`` / ``max_block_seconds``:
    how much of this host's recent use, and at most of the job's rate, one
    claim takes. ``default_pause`` / ``max_pause``: as RateGate's.
    """

    def __init__(
        self,
        ledger: LeasingLedger,
        rate: float,
        *,
        clock: Clock,
        margin: float = 0.04,
        default_pause: float = 1.0,
        max_pause: float = 60.0,
        block_seconds: float = 0.2,
        max_block_seconds: float = 0.25,
    ) -> None:
        if margin < 0 or default_pause < 0 or max_pause < 0:
            raise ValueError("margin and pauses must not be negative")
        if not (0 < block_seconds <= max_block_seconds):
            raise ValueError("0 < block_seconds <= max_block_seconds, please")
        _check_rate(rate)
        self._ledger = ledger
        self._clock = clock
        self._margin = margin
        self._tolerance = margin / 2  # of the one-second window
        self._default_pause = default_pause
        self._max_pause = max_pause
        self._block_seconds = block_seconds
        self._max_block_seconds = max_block_seconds
        self._rate = rate
        self._current = rate  # as the ledger last said
        self._push_rate: float | None = rate  # a ceiling the ledger has not seen yet
        self._push_pause: float | None = None  # a 429's pause the ledger has not seen yet
        self._slots: deque[float] = deque()  # claimed slots, on this host's clock
        self._paused_until = -math.inf
        self._offset: float | None = None  # ledger time minus this host's clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=_OFFSET_SAMPLES)
        self._recent: deque[float] = deque()  # grants in the last second
        self._turn = anyio.Lock()  # FIFO: the holder claims and sleeps for everyone
        self._waiting = 0
        self._nap: anyio.CancelScope | None = None  # the head's sleep, cut short by news
        self._retry = _RETRY_FIRST
        self._granted = 0
        self.claims = 0  # round trips to the ledger so far
        self.wasted = 0  # slots claimed but not used (late, paused, or not needed)

    # -- RateGate's queries -------------------------------------------------

    @property
    def clock(self) -> Clock:
        """The clock this gate reads."""
        return self._clock

    @property
    def rate(self) -> float:
        """The job's configured rate (all hosts together)."""
        return self._rate

    @property
    def window(self) -> float:
        """The window, in seconds, over which ``rate`` is counted."""
        return 1.0

    @property
    def granted(self) -> int:
        """Acquisitions granted so far (by this host)."""
        return self._granted

    @property
    def current_rate(self) -> float:
        """The job's rate in force as of the last claim: the rate last set by any
        host, or less after a 429."""
        return self._current

    def paused_for(self) -> float:
        """Seconds left of the pause caused by the last 429 this host knows of."""
        return max(0.0, self._paused_until - self._clock.now())

    def has_capacity(self) -> bool:
        """Whether an :meth:`acquire` now would return without waiting."""
        now = self._clock.now()
        return (
            self._waiting == 0
            and bool(self._slots)
            and self._slots[0] <= now <= self._slots[0] + self._tolerance
            and now >= self._paused_until
        )

    # -- acquiring ------------------------------------------------------------

    async def acquire(self, *, urgent: bool = False) -> None:
        """Wait until one more API request may be sent by this host, and count it.

        Callers are served first come, first served (``urgent`` is accepted
        for :class:`~batcher.ratelimit.RateGate`'s signature and not used:
        the slots are the ledger's); cancelling a waiting
        caller is safe. While the ledger cannot be reached, callers wait (and
        the gate says so in the log): it never sends unpaced.
        """
        self._waiting += 1
        try:
            async with self._turn:
                await self._wait_for_slot()
        finally:
            self._waiting -= 1

    async def _wait_for_slot(self) -> None:
        clock = self._clock
        while True:
            now = clock.now()
            self._drop_unusable(now)
            news = self._push_pause is not None or self._push_rate is not None
            if not self._slots or news:
                await self._claim()
                continue
            due = self._slots[0]
            if now >= due:
                self._slots.popleft()
                self._grant(now)
                return
            with anyio.CancelScope() as nap:  # news (a 429) wakes it to report at once
                self._nap = nap
                await clock.sleep(due - now)
            self._nap = None

    def _drop_unusable(self, now: float) -> None:
        """Waste slots that are too late to use, or fall in a 429's pause."""
        slots = self._slots
        while slots and (slots[0] + self._tolerance < now or slots[0] < self._paused_until):
            slots.popleft()
            self.wasted += 1

    def _grant(self, now: float) -> None:
        self._granted += 1
        self._recent.append(now)

    def _block_size(self, now: float) -> int:
        recent = self._recent
        while recent and recent[0] < now - 1.0:
            recent.popleft()
        wanted = max(self._waiting, math.ceil(len(recent) * self._block_seconds))
        most = max(1, math.floor(self.current_rate * self._max_block_seconds))
        return max(1, min(wanted, most))

    def _lead(self) -> float:
        """How far ahead of the ledger's now a block must start to be usable here."""
        if not self._samples:
            return _FIRST_LEAD
        return 2 * min(rtt for rtt, _ in self._samples) + 0.005

    async def _claim(self) -> None:
        """One round trip: report what the ledger must know, take a block of slots."""
        clock = self._clock
        count = 0 if self._slots else self._block_size(clock.now())
        rate, self._push_rate = self._push_rate, None
        pause, self._push_pause = self._push_pause, None
        sent = clock.now()
        try:
            claim = await self._ledger.claim_slots(
                count, lead=self._lead(), margin=self._margin, rate=rate, pause=pause
            )
        except BaseException as exc:
            # Keep what was not reported for the next claim.
            self._push_rate = self._push_rate if self._push_rate is not None else rate
            if pause is not None:
                self._push_pause = max(pause, self._push_pause or 0.0)
            if not isinstance(exc, LedgerError):
                raise
            log.warning("the shared pace could not be read (%s); trying again in %.1f s", exc,
                        self._retry,
                        extra=event(RATE_CLAIM_FAILED, error=str(exc), wait=self._retry))
            await clock.sleep(self._retry)
            self._retry = min(_RETRY_MAX, self._retry * 2)
            return
        received = clock.now()
        self._retry = _RETRY_FIRST
        self.claims += 1
        offset = self._learn_offset(sent, received, claim.now)
        self._current = claim.rate
        self._paused_until = max(self._paused_until, claim.paused_until - offset)
        self._slots.extend(
            claim.first_at + i * claim.spacing - offset for i in range(claim.count)
        )

    def _learn_offset(self, sent: float, received: float, ledger_now: float) -> float:
        """Ledger time minus local time, from the fastest of the recent round trips.

        The ledger read its clock somewhere between ``sent`` and
        ``received``; taking the midpoint errs by at most half the round trip.
        """
        self._samples.append((received - sent, ledger_now - (sent + received) / 2))
        self._offset = min(self._samples)[1]
        return self._offset

    # -- adapting ------------------------------------------------------------------

    def on_rate_limited(self, retry_after: float | None = None) -> None:
        """Record a 429: pause this host now; every host once the ledger hears of it.

        The pause lasts ``retry_after`` seconds (``default_pause`` when the
        server gave none; at most ``max_pause``). The next claim carries it
        to the ledger, which halves the job's rate (see
        :meth:`~batcher.ledger.base.LeasingLedger.claim_slots`).
        """
        pause = self._default_pause if retry_after is None else retry_after
        pause = min(max(pause, 0.0), self._max_pause)
        self._paused_until = max(self._paused_until, self._clock.now() + pause)
        self._push_pause = max(pause, self._push_pause or 0.0)
        self._wake()
        log.warning("rate limited: every host pauses %.1f s and slows down", pause,
                    extra=event(RATE_LIMITED, retry_after=retry_after, pause=pause))

    def set_rate(self, rate: float) -> None:
        """Change the job's rate (for all hosts: not a share of it).

        It reaches the ledger with this host's next claim; from then on every
        host's new blocks follow it.
        """
        _check_rate(rate)
        self._rate = rate
        self._push_rate = rate
        self._wake()

    def _wake(self) -> None:
        """Cut the waiting caller's sleep short: it has news for the ledger."""
        if self._nap is not None:
            self._nap.cancel()

    def __repr__(self) -> str:
        now = self._clock.now()
        state = (
            f"job rate {self.current_rate:g}/{self._rate:g} per 1s, margin {self._margin:g}, "
            f"granted {self.granted}, claims {self.claims}, wasted {self.wasted}, "
            f"slots {len(self._slots)}, waiting {self._waiting}"
        )
        if self._paused_until > now:
            state += f", paused for {self._paused_until - now:.3f}s"
        return f"<SharedRateGate [{state}]>"


def gate_for(ledger: Ledger, rate: float, *, clock: Clock) -> Gate:
    """The rate gate of a run on ``ledger``: ``rate`` is the whole job's ``--rate``.

    A shared ledger (several hosts) gets a :class:`SharedRateGate` drawing
    from the job's one pace, so the hosts' sum never passes ``rate``; a
    private one a :class:`~batcher.ratelimit.RateGate` of its own.
    """
    if is_shared(ledger):
        return SharedRateGate(ledger, rate, clock=clock, margin=SHARED_MARGIN)
    return RateGate(rate, clock=clock)


def _check_rate(rate: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number, not {rate!r}")

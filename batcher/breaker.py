"""A circuit breaker for the API host: an outage pauses the run, it fails no row.

When the API host stops answering, every request in flight fails the same
way. Retrying each of them on its own would spend every row's attempts on the
outage and fail rows that would succeed a minute later, paid ones included.
The breaker tells an outage from one bad request:

* **closed** — requests go out. A transport failure (no HTTP answer, or a
  gateway's 502/503/504) of a request is remembered by the request's key;
  ``threshold`` failures of *different* requests in a row, with no success
  between them, open the breaker. One request failing again and again does
  not: that is the request's problem, and its retries end in a row error.
* **open** — nobody sends. Callers wait in :meth:`CircuitBreaker.request`
  without spending attempts. After ``backoff`` seconds one caller becomes the
  probe (**half-open**); everyone else keeps waiting.
* the probe's verdict: any HTTP answer closes the breaker and wakes everyone;
  another failure opens it again with the backoff doubled (up to
  ``max_backoff``).

An outage longer than ``patience`` seconds (measured from the first failure
no answer has followed since) ends in :class:`~batcher.errors.ApiUnavailable`,
which halts the run resumably: rows keep their stages and the same command
finishes them later. A request that fails while the host has answered
nobody since the request first failed is marked (``Verdict.outage``, then
``ApiError.outage``): the run spends none of the row's attempts on it. A
transport error fails a row only when the rest of the host answers.

:class:`Breakers` holds one breaker per host (the API host, the upload host,
the storage host of signed URLs), all with the same settings.

Time comes only from the injected :class:`~batcher.clock.Clock`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

import anyio

from batcher.clock import Clock
from batcher.errors import ApiError, ApiUnavailable, ServerError, TransportError
from batcher.ops.logs import API_PROBE_FAILED, API_REACHABLE, API_UNREACHABLE, event

__all__ = ["Admission", "BreakerConfig", "BreakerState", "Breakers", "CircuitBreaker", "Verdict",
           "unanswered"]

log = logging.getLogger(__name__)


def unanswered(err: ApiError) -> bool:
    """Whether ``err`` says the host did not answer (no HTTP answer, or a gateway's)."""
    if isinstance(err, TransportError):
        return True
    return isinstance(err, ServerError) and err.status in (502, 503, 504)


# Failing requests remembered by their first failure, at most; past it the
# memory starts afresh (a request then counts its attempts as usual).
FIRST_FAILURES_KEPT = 10_000
# URLs whose breaker is remembered, at most.
_URLS_KEPT = 256


class BreakerState(StrEnum):
    """Where the breaker is."""

    CLOSED = "closed"  # requests go out
    OPEN = "open"  # nobody sends until the next probe is due
    HALF_OPEN = "half-open"  # one probe is out; the rest wait for its verdict


class Verdict:
    """What one request's caller says happened; unset means "no verdict".

    A request that ends without a verdict (cancelled, or failed in a way that
    says nothing about the host) changes nothing, except that a probe without
    a verdict hands the probe on to the next caller.
    """

    __slots__ = ("outage", "reachable")

    def __init__(self) -> None:
        self.reachable: bool | None = None
        # Set by the breaker on an unreachable verdict: no answer from the
        # host came since this request first failed, so the failure may be
        # an outage rather than the request's own.
        self.outage = False

    def answered(self) -> None:
        """The host answered (any HTTP status but a gateway's 502/503/504)."""
        self.reachable = True

    def unreachable(self) -> None:
        """No answer: connect or read failure, timeout, or a gateway error."""
        self.reachable = False


class CircuitBreaker:
    """Pauses every API request while the host is down; see the module docstring.

    ``host`` names what is down in messages (never a URL with credentials).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        host: str,
        threshold: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        patience: float = 600.0,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if backoff <= 0 or max_backoff < backoff or patience < 0:
            raise ValueError("backoff, max_backoff and patience must be sensible")
        self._clock = clock
        self.host = host
        self.threshold = threshold
        self.base_backoff = backoff
        self.max_backoff = max_backoff
        self.patience = patience
        self.state = BreakerState.CLOSED
        self._failed: set[Hashable] = set()
        self._backoff = backoff
        self._opened_at: float | None = None
        # The first failure no answer has followed since (None: all answered).
        self._unanswered_since: float | None = None
        # When each failing request first failed, and when the host last answered.
        self._first_failure: dict[Hashable, float] = {}
        self._answered_at: float | None = None
        self._probe_at = 0.0
        self._changed = anyio.Event()
        self.opened = 0  # how many outages were seen (for operators)
        self.paused_seconds = 0.0  # total time spent open

    @property
    def down_since(self) -> float | None:
        """Clock time at which the current outage began, or None."""
        return self._opened_at

    def suspects_outage(self) -> bool:
        """True while a failure stands that no answer has followed: maybe an outage."""
        return self._unanswered_since is not None

    def _alone_since(self, key: Hashable) -> bool:
        """Whether no answer came from the host since ``key`` first failed."""
        first = self._first_failure.get(key)
        return first is not None and (self._answered_at is None or first >= self._answered_at)

    def request(self, key: Hashable) -> Admission:
        """``async with breaker.request(key) as verdict``: wait until a request
        may go out, then let the caller send it.

        The caller sets the yielded :class:`Verdict`. Raises ApiUnavailable
        when the outage has lasted longer than ``patience``.
        """
        return Admission(self, key)

    def _leave(self, key: Hashable, verdict: Verdict, *, probe: bool) -> None:
        self._settle(key, verdict.reachable, probe=probe)
        if verdict.reachable is False:
            verdict.outage = self._alone_since(key)

    async def _admit(self) -> bool:
        """Return once sending is allowed; True when this caller is the probe."""
        while True:
            now = self._clock.now()
            since = self._unanswered_since
            if since is not None and now - since >= self.patience:
                raise ApiUnavailable(
                    f"{self.host} has not answered for {now - since:.0f} s "
                    f"(--outage-patience {self.patience:.0f} s); rows keep their stages: "
                    "run the same command again to finish",
                    host=self.host,
                )
            if self.state is BreakerState.CLOSED:
                return False
            assert self._opened_at is not None and since is not None
            if self.state is BreakerState.OPEN and now >= self._probe_at:
                self.state = BreakerState.HALF_OPEN
                return True
            if self.state is BreakerState.OPEN:
                wait = min(self._probe_at, since + self.patience) - now
            else:
                # A probe is out: wait for its verdict, but wake in time to
                # give up once patience runs out.
                wait = since + self.patience - now
            await self._wait(wait)

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` on the clock, or less if the state changes."""
        changed = self._changed
        async with anyio.create_task_group() as tg:

            async def sleeper() -> None:
                await self._clock.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            await changed.wait()
            tg.cancel_scope.cancel()

    def _settle(self, key: Hashable, reachable: bool | None, *, probe: bool) -> None:
        now = self._clock.now()
        if reachable is True:
            self._failed.clear()
            self._unanswered_since = None
            self._answered_at = now
            self._first_failure.pop(key, None)
            if len(self._first_failure) > FIRST_FAILURES_KEPT:
                self._first_failure.clear()  # rows that failed for good; start afresh
            if self.state is not BreakerState.CLOSED:
                self._close()
            return
        if reachable is None:
            if probe and self.state is BreakerState.HALF_OPEN:
                # The probe gave no verdict: the next caller probes at once.
                self.state = BreakerState.OPEN
                self._probe_at = self._clock.now()
                self._notify()
            return
        self._first_failure.setdefault(key, now)
        if probe or self.state is not BreakerState.CLOSED:
            if probe and self.state is BreakerState.HALF_OPEN:
                self._backoff = min(self.max_backoff, self._backoff * 2)
                self.state = BreakerState.OPEN
                self._probe_at = self._clock.now() + self._backoff
                log.info("%s still does not answer; next probe in %.1f s", self.host,
                         self._backoff, extra=event(API_PROBE_FAILED, host=self.host,
                                                    next_probe_in=self._backoff))
                self._notify()
            return
        self._failed.add(key)
        if self._unanswered_since is None:
            self._unanswered_since = self._clock.now()
        if len(self._failed) >= self.threshold:
            self._open()

    def _open(self) -> None:
        now = self._clock.now()
        self.state = BreakerState.OPEN
        self._opened_at = now
        self._backoff = self.base_backoff
        self._probe_at = now + self._backoff
        self.opened += 1
        log.warning("%s does not answer (%d requests failed): requests pause", self.host,
                    len(self._failed), extra=event(API_UNREACHABLE, host=self.host,
                                                   failed_requests=len(self._failed)))
        self._notify()

    def _close(self) -> None:
        assert self._opened_at is not None
        down = self._clock.now() - self._opened_at
        self.paused_seconds += down
        log.warning("%s answers again after %.1f s: requests go on", self.host, down,
                    extra=event(API_REACHABLE, host=self.host, down_seconds=round(down, 3)))
        self.state = BreakerState.CLOSED
        self._opened_at = None
        self._backoff = self.base_backoff
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def __repr__(self) -> str:
        return (f"CircuitBreaker(host={self.host!r}, state={self.state.value}, "
                f"failures={len(self._failed)}/{self.threshold}, outages={self.opened})")


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The settings every host's breaker gets (see :class:`CircuitBreaker`)."""

    threshold: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    patience: float = 600.0


class Admission:
    """One request's passage through a breaker (see :meth:`CircuitBreaker.request`).

    A class rather than a generator-based context manager: it is entered
    for every request, and this way costs no generator or wrapper frames.
    """

    __slots__ = ("_breaker", "_key", "_probe", "verdict")

    def __init__(self, breaker: CircuitBreaker, key: Hashable) -> None:
        self._breaker = breaker
        self._key = key
        self._probe = False
        self.verdict = Verdict()

    async def __aenter__(self) -> Verdict:
        self._probe = await self._breaker._admit()
        return self.verdict

    async def __aexit__(self, *exc_info: object) -> None:
        self._breaker._leave(self._key, self.verdict, probe=self._probe)


class Breakers:
    """One :class:`CircuitBreaker` per host, made on first use."""

    def __init__(self, clock: Clock, config: BreakerConfig | None = None) -> None:
        self._clock = clock
        self.config = config or BreakerConfig()
        self._by_host: dict[str, CircuitBreaker] = {}
        # The API's few URLs come again and again: parse each once.
        self._by_url: dict[str, CircuitBreaker] = {}

    def for_url(self, url: str) -> CircuitBreaker:
        """The breaker of the host ``url`` goes to (named without credentials)."""
        breaker = self._by_url.get(url)
        if breaker is not None:
            return breaker
        breaker = self._for_host(url)
        if len(self._by_url) >= _URLS_KEPT:
            self._by_url.clear()  # signed URLs are each used once
        self._by_url[url] = breaker
        return breaker

    def _for_host(self, url: str) -> CircuitBreaker:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        breaker = self._by_host.get(host)
        if breaker is None:
            c = self.config
            breaker = CircuitBreaker(self._clock, host=host, threshold=c.threshold,
                                     backoff=c.backoff, max_backoff=c.max_backoff,
                                     patience=c.patience)
            self._by_host[host] = breaker
        return breaker

    def suspects_outage(self) -> bool:
        """True while some host has failures no answer has followed."""
        return any(b.suspects_outage() for b in self._by_host.values())

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._by_host.values()))

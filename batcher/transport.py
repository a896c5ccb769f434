"""What every HTTP exchange shares: the connections, the cap, the timeout, the report.

A run holds two kinds of connections (:class:`HttpSessions`): keep-alive
pools of the lean HTTP/1.1 client (:mod:`batcher.http1`) for the API's JSON
requests, one per origin, and an aiohttp session for file bytes
(:mod:`batcher.storage`), opened only when a run first moves a file, so a
run of project rows never imports aiohttp.

:class:`Transport` is what the API client and storage share: those
connections, the concurrency cap, the timeout, the report of each exchange
(``on_request``), the hosts' circuit breakers, and the one place where a
failed exchange (the lean client's, aiohttp's, the OS's, a timeout) becomes
batcher's :class:`~batcher.errors.TransportError` (:meth:`Transport.error`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from batcher.breaker import Admission, Breakers, Verdict
from batcher.clock import Clock
from batcher.errors import ApiError, DecodeError, TransportError
from batcher.http1 import ConnectFailed, CutShort, Disconnected, Http1Pool, HttpFailure
from batcher.scrub import KeyScrubber

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "API_TRANSPORT_EXCEPTIONS",
    "GATEWAY_STATUSES",
    "Guarded",
    "HttpSessions",
    "RequestCallback",
    "Transport",
    "judge_answer",
]

RequestCallback = Callable[[str, int | None, float], None]
"""``on_request(endpoint, status or None on transport failure, seconds)``."""

# What the lean client raises for a failed exchange: HttpFailure and the
# OS's errors are OSErrors; an exchange past its time raises TimeoutError.
API_TRANSPORT_EXCEPTIONS: tuple[type[BaseException], ...] = (OSError, TimeoutError)

# A gateway's answers: the host behind it did not answer.
GATEWAY_STATUSES = frozenset({502, 503, 504})


def judge_answer(verdict: Verdict, status: int) -> None:
    """An HTTP answer: the host is up, unless a gateway says the host behind it is not."""
    if status in GATEWAY_STATUSES:
        verdict.unreachable()
    else:
        verdict.answered()


class HttpSessions:
    """A run's connections: API pools by origin, and the file session on first use.

    ``files`` may be given (an ``aiohttp.ClientSession`` the caller owns and
    closes); otherwise one is opened when first asked for, with room for
    ``limit`` connections, and closed by :meth:`aclose`. ``limit`` is also how
    many idle connections each API pool keeps.
    """

    __slots__ = ("_files", "_owns_files", "_pools", "limit")

    def __init__(self, *, limit: int = 72, files: aiohttp.ClientSession | None = None) -> None:
        self.limit = limit
        self._files = files
        self._owns_files = files is None
        self._pools: dict[str, Http1Pool] = {}

    def __repr__(self) -> str:
        return f"HttpSessions(pools={sorted(self._pools)!r}, files={self._files is not None})"

    def api(self, origin: str) -> Http1Pool:
        """The keep-alive pool for ``origin`` (``scheme://host[:port]``)."""
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = Http1Pool(origin, max_idle=self.limit)
        return pool

    @property
    def files(self) -> aiohttp.ClientSession:
        """The aiohttp session for file bytes, opened (and aiohttp imported) on first use."""
        if self._files is None:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.limit, limit_per_host=self.limit)
            # No cookie jar: the hosts set none, and the jar costs every
            # request a filter and every answer a parse of its headers.
            self._files = aiohttp.ClientSession(connector=connector,
                                                cookie_jar=aiohttp.DummyCookieJar())
        return self._files

    async def aclose(self) -> None:
        """Close every pool, and the file session if it was opened here."""
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()
        if self._owns_files and self._files is not None:
            files, self._files = self._files, None
            await files.close()

    async def __aenter__(self) -> HttpSessions:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


class Guarded:
    """One exchange under its host's breaker (see :meth:`Transport.guarded`)."""

    __slots__ = ("_admission", "_verdict")

    def __init__(self, admission: Admission | None) -> None:
        self._admission = admission
        self._verdict = Verdict() if admission is None else admission.verdict

    async def __aenter__(self) -> Verdict:
        if self._admission is not None:
            await self._admission.__aenter__()
        return self._verdict

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._admission is not None:
            await self._admission.__aexit__(exc_type, exc, tb)
            if isinstance(exc, ApiError) and self._verdict.outage:
                exc.outage = True


@dataclass(frozen=True, slots=True, repr=False)
class Transport:
    """The HTTP plumbing shared by the API client and storage.

    It holds no credential: the API client adds its key to its own requests
    and scrubs its own errors of it.
    """

    http: HttpSessions
    cap: anyio.CapacityLimiter
    timeout: float
    clock: Clock
    on_request: RequestCallback | None = None
    # One circuit breaker per host (None: no breaker, every failure is the
    # request's own).
    breakers: Breakers | None = None

    def __repr__(self) -> str:
        return f"Transport(timeout={self.timeout})"

    def guarded(self, url: str, key: Hashable) -> Guarded:
        """``async with transport.guarded(url, key) as verdict``: wait until
        ``url``'s host may be sent to; the caller gives the verdict.

        Raises :class:`~batcher.errors.ApiUnavailable` once the host has been
        down longer than the patience. An ``ApiError`` leaving the block
        carries the breaker's judgement (``outage``) for the retry decision.
        """
        return Guarded(None if self.breakers is None else self.breakers.for_url(url).request(key))

    def report(self, endpoint: str, status: int | None, start: float) -> None:
        """One exchange ended (``status`` None: no answer); ``start`` from :attr:`clock`."""
        if self.on_request is not None:
            self.on_request(endpoint, status, self.clock.now() - start)

    def error(self, exc: BaseException, endpoint: str, *,
              scrub: KeyScrubber | None = None) -> ApiError:
        """Translate a failed exchange (lean client, aiohttp, OS, timeout) into the error tree.

        ``scrub`` cleans the message (the API client passes its key's scrubber).
        """
        if isinstance(exc, TimeoutError):
            what = f"no answer within the timeout ({type(exc).__name__})"
        elif isinstance(exc, Disconnected):
            what = "the server closed the connection before answering"
        elif isinstance(exc, CutShort | ConnectFailed | HttpFailure):
            what = str(exc)
        else:
            reason = _aiohttp_reason(exc)
            if reason is None:
                return DecodeError(f"invalid URL: {exc}", endpoint=endpoint)
            what = reason
        return TransportError(scrub.text(what) if scrub else what, endpoint=endpoint)


def _aiohttp_reason(exc: BaseException) -> str | None:
    """The words for an aiohttp (or OS) failure; None for an invalid URL."""
    aiohttp = sys.modules.get("aiohttp")  # only a run that moved files has imported it
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return "the server closed the connection before answering"
        if isinstance(exc, aiohttp.ClientPayloadError):
            return f"the answer was cut short: {exc}"
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"cannot connect: {exc}"
        if isinstance(exc, aiohttp.InvalidURL):
            return None
    return f"{type(exc).__name__}: {exc}"

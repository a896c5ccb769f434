"""The one seam through which batcher measures time and waits.

The rate gate, the retry loop, the poller and the runner's stages take a
:class:`Clock` instead of calling :func:`time.monotonic` and
:func:`anyio.sleep` directly, so tests can drive them with a fake clock and
no real waiting.

Wall time (seconds since the epoch, for timestamps and the expiry dates the
API sends) is another thing, passed as a :data:`WallTime` callable named
``wall``: a clock measures durations and never says what day it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import anyio

__all__ = ["Clock", "SystemClock", "WallTime"]

WallTime = Callable[[], float]
"""Seconds since the epoch, as :func:`time.time` gives them; never used to wait."""


@runtime_checkable
class Clock(Protocol):
    """Monotonic time and sleeping, injected where tests need to control them."""

    def now(self) -> float:
        """Seconds on a monotonic scale; only differences are meaningful."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (at least one scheduling point when ``seconds <= 0``)."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic` and :func:`anyio.sleep`.

    ``time.monotonic`` is the clock the asyncio event loop uses for its
    timers, so a sleep until ``now() + d`` never wakes before ``now() + d``
    as seen by :meth:`now` (beyond the loop's clock resolution).
    """

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"

"""Sliding one-second windows: the exact request-rate stat and the 429 limiter.

A window at time ``t`` holds the arrivals in ``(t - 1, t]``: requests spaced
exactly ``1/R`` apart therefore never show more than ``R`` per window.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["RateLimiter", "SlidingWindow"]

WINDOW_SECONDS = 1.0


class SlidingWindow:
    """Arrival times of the last second, and the most ever seen at once."""

    __slots__ = ("_times", "peak")

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self.peak = 0

    def _expire(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - WINDOW_SECONDS:
            times.popleft()

    def count(self, now: float) -> int:
        """How many arrivals the window ending at ``now`` holds."""
        self._expire(now)
        return len(self._times)

    def add(self, now: float) -> int:
        """Record an arrival at ``now``; return the window's count including it."""
        self._expire(now)
        self._times.append(now)
        self.peak = max(self.peak, len(self._times))
        return len(self._times)

    def seconds_until_room(self, now: float, limit: int) -> float:
        """How long until the window holds fewer than ``limit`` arrivals."""
        self._expire(now)
        excess = len(self._times) - limit
        if excess < 0:
            return 0.0
        # The arrival that must leave for a slot to open.
        return self._times[excess] + WINDOW_SECONDS - now

    def __repr__(self) -> str:
        return f"SlidingWindow(in_window={len(self._times)}, peak={self.peak})"


class RateLimiter:
    """Per-key admission: at most ``limit`` admitted requests in any 1 s window.

    Only admitted requests fill the window, so a client that backs off on
    429 gets through again once its own earlier requests have aged out.
    """

    __slots__ = ("_admitted",)

    def __init__(self) -> None:
        self._admitted: dict[str, SlidingWindow] = {}

    def admit(self, key: str, now: float, limit: float) -> int | None:
        """Admit the request (None) or return the ``Retry-After`` in whole seconds (>= 1)."""
        window = self._admitted.setdefault(key, SlidingWindow())
        cap = max(1, math.floor(limit))
        if window.count(now) >= cap:
            return max(1, math.ceil(window.seconds_until_room(now, cap)))
        window.add(now)
        return None

"""When to try an API request again, after how long, and the one loop that does.

:meth:`RetryPolicy.decide` is a pure function of the error, the number of
attempts already made and a random source. :func:`retrying` is the one retry
loop: every stage that retries passes it an attempt and a decision (the
policy's, or the policy's with a rule of the stage's own); the client makes
one attempt per call. Only errors that are classified as retryable are
retried, never blindly, and always with the same request, hence the same
idempotency key.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from batcher.clock import Clock
from batcher.errors import ApiError, RateLimited

__all__ = ["Decide", "Jitter", "RetryPolicy", "retrying"]

T = TypeVar("T")

Jitter = Literal["full", "none"]

Decide = Callable[[ApiError, int], float | None]
"""``decide(error, attempts_made)``: seconds to wait before the next attempt, or None."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded attempts, ``Retry-After`` honoured.

    - ``max_attempts``: HTTP attempts per request in all, the first included.
    - ``base`` / ``cap``: the n-th retry's backoff ceiling is
      ``min(cap, base * 2**(n-1))``; with ``jitter="full"`` the wait is
      uniform in ``[0, ceiling]`` (AWS "full jitter": spreads a crowd of
      failed workers), with ``"none"`` it is the ceiling itself.
    - ``rate_limited_attempts``: a 429 means the server did no work, so it
      may be retried more often than other failures; the bound for a
      ``RateLimited`` error is ``max(max_attempts, rate_limited_attempts)``.
    - ``max_retry_after``: the longest ``Retry-After`` honoured as is; a
      longer one is shortened to this (the rate gate pauses everyone anyway).
    - ``waits``: ``False`` makes every wait 0 while keeping the attempt
      bounds — the testing switch, see :meth:`no_wait`.
    """

    max_attempts: int = 6
    base: float = 0.5
    cap: float = 30.0
    jitter: Jitter = "full"
    rate_limited_attempts: int = 12
    max_retry_after: float = 300.0
    waits: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.rate_limited_attempts < 1:
            raise ValueError("attempt bounds must be at least 1")
        if self.base < 0 or self.cap < 0 or self.max_retry_after < 0:
            raise ValueError("waits must not be negative")
        if self.jitter not in ("full", "none"):
            raise ValueError(f"unknown jitter {self.jitter!r}")

    @classmethod
    def no_wait(cls, max_attempts: int = 6, rate_limited_attempts: int = 12) -> RetryPolicy:
        """A policy with the usual attempt bounds but no waiting (for tests).

        To strip the waits from an existing policy use
        ``dataclasses.replace(policy, waits=False)`` or :meth:`without_waits`.
        """
        return cls(
            max_attempts=max_attempts, rate_limited_attempts=rate_limited_attempts, waits=False
        )

    def without_waits(self) -> RetryPolicy:
        """This policy with every wait set to 0."""
        return dataclasses.replace(self, waits=False)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The jittered backoff after ``attempt`` failed attempts (``attempt >= 1``)."""
        # min() before the power would overflow on absurd attempt numbers.
        exponent = min(max(attempt - 1, 0), 64)
        ceiling = min(self.cap, self.base * 2.0**exponent)
        if self.jitter == "full":
            return rng.uniform(0.0, ceiling)
        return ceiling

    def decide(self, error: ApiError, attempt: int, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to give up.

        ``attempt`` is the number of attempts already made (1 after the first
        failure). Non-retryable errors give ``None`` at once. A
        ``RateLimited`` error waits at least its ``retry_after``.
        """
        if not error.retryable:
            return None
        limit = self.max_attempts
        if isinstance(error, RateLimited):
            limit = max(limit, self.rate_limited_attempts)
        if attempt >= limit:
            return None
        if not self.waits:
            return 0.0
        wait = self.backoff(attempt, rng)
        if isinstance(error, RateLimited) and error.retry_after is not None:
            wait = max(wait, min(error.retry_after, self.max_retry_after))
        return wait


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    decide: Decide,
    *,
    clock: Clock,
    before: Callable[[], None] | None = None,
    on_retry: Callable[[ApiError, int, float], None] | None = None,
) -> T:
    """Await ``attempt()`` until it returns; after an ``ApiError``, ask ``decide``.

    ``decide(error, n)`` gets the error and the number of attempts made so
    far, and returns the seconds to wait before the next one, or None to
    re-raise the error. ``before()`` runs before every attempt (to count it),
    ``on_retry(error, n, wait)`` before every wait (to log it). Errors that
    are not ``ApiError``s pass through at once.
    """
    made = 0
    while True:
        made += 1
        if before is not None:
            before()
        try:
            return await attempt()
        except ApiError as err:
            wait = decide(err, made)
            if wait is None:
                raise
            if on_retry is not None:
                on_retry(err, made, wait)
            await clock.sleep(wait)

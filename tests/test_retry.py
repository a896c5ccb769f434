"""RetryPolicy.decide: which errors are retried, how long to wait, and when to stop;
retrying: the one loop that acts on it."""

from __future__ import annotations

import dataclasses
import random

import pytest
from fakeclock import FakeClock
from hypothesis import given
from hypothesis import strategies as st

from batcher.errors import (
    ApiError,
    AuthError,
    ClientError,
    Conflict,
    DecodeError,
    RateLimited,
    RequestBug,
    ServerError,
    SpendLimit,
    TransportError,
)
from batcher.retry import RetryPolicy, retrying


def retryable_errors(retry_after: float | None = None) -> list[ApiError]:
    return [
        TransportError("reset", endpoint="e"),
        DecodeError("cut", status=200, endpoint="e"),
        ServerError("boom", status=500, endpoint="e"),
        ServerError("gw", status=502, endpoint="e"),
        RateLimited("slow", status=429, retry_after=retry_after, endpoint="e"),
    ]


FINAL_ERRORS: list[ApiError] = [
    ClientError("bad", status=400, endpoint="e"),
    ClientError("missing", status=404, code="notFound", endpoint="e"),
    ClientError("not yours", status=403, code="notOwner", endpoint="e"),
    AuthError("who", status=401, endpoint="e"),
    AuthError("inactive", status=403, code="forbidden", endpoint="e"),
    SpendLimit("money", status=402, endpoint="e"),
    Conflict("key reused", status=409, code="idempotencyKeyConflict", endpoint="e"),
    RequestBug("method", status=405, endpoint="e"),
]


@pytest.mark.parametrize("error", FINAL_ERRORS, ids=lambda e: f"{e.http_status}-{e.code}")
def test_non_retryable_errors_give_up_at_once(error: ApiError) -> None:
    policy = RetryPolicy()
    assert policy.decide(error, 1, random.Random(0)) is None


@pytest.mark.parametrize("error", retryable_errors(), ids=lambda e: e.code)
def test_retryable_errors_are_retried_until_the_bound(error: ApiError) -> None:
    policy = RetryPolicy(max_attempts=4, rate_limited_attempts=1)
    rng = random.Random(1)
    waits = [policy.decide(error, attempt, rng) for attempt in range(1, 6)]
    assert all(w is not None for w in waits[:3])
    assert waits[3:] == [None, None]


def test_rate_limited_gets_its_own_larger_bound() -> None:
    policy = RetryPolicy(max_attempts=3, rate_limited_attempts=8)
    err = RateLimited("slow", status=429, endpoint="e")
    rng = random.Random(2)
    assert policy.decide(err, 7, rng) is not None
    assert policy.decide(err, 8, rng) is None
    assert policy.decide(ServerError("x", status=500), 3, rng) is None


def test_backoff_ceiling_doubles_then_caps_without_jitter() -> None:
    policy = RetryPolicy(base=0.5, cap=3.0, jitter="none", max_attempts=10)
    err = ServerError("x", status=503)
    waits = [policy.decide(err, a, random.Random(0)) for a in range(1, 7)]
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_full_jitter_spreads_waits_below_the_ceiling() -> None:
    policy = RetryPolicy(base=1.0, cap=30.0, max_attempts=10)
    err = TransportError("reset")
    rng = random.Random(3)
    waits = [policy.decide(err, 4, rng) for _ in range(500)]
    assert all(w is not None and 0.0 <= w <= 8.0 for w in waits)
    values = [w for w in waits if w is not None]
    # spread over the range, not stuck at the ceiling
    assert min(values) < 1.0 and max(values) > 7.0
    assert 3.0 < sum(values) / len(values) < 5.0


def test_retry_after_is_a_floor_on_the_wait() -> None:
    policy = RetryPolicy(base=0.1, cap=1.0)
    err = RateLimited("slow", status=429, retry_after=7.0)
    rng = random.Random(4)
    assert all(policy.decide(err, a, rng) == 7.0 for a in range(1, 6))
    # a backoff longer than retry_after wins
    policy = RetryPolicy(base=10.0, cap=30.0, jitter="none")
    assert policy.decide(RateLimited("s", status=429, retry_after=2.0), 2, rng) == 20.0


def test_absurd_retry_after_is_bounded() -> None:
    policy = RetryPolicy(max_retry_after=120.0)
    err = RateLimited("slow", status=429, retry_after=86400.0)
    assert policy.decide(err, 1, random.Random(0)) == 120.0


def test_no_wait_keeps_the_bounds_but_not_the_waits() -> None:
    policy = RetryPolicy.no_wait(max_attempts=3)
    err = RateLimited("slow", status=429, retry_after=30.0)
    rng = random.Random(5)
    assert policy.decide(err, 1, rng) == 0.0
    assert policy.decide(ServerError("x", status=500), 2, rng) == 0.0
    assert policy.decide(ServerError("x", status=500), 3, rng) is None
    assert policy.decide(AuthError("x", status=401), 1, rng) is None
    slow = RetryPolicy(base=5.0)
    assert slow.without_waits() == dataclasses.replace(slow, waits=False)
    assert slow.without_waits().decide(TransportError("t"), 1, rng) == 0.0


def test_policy_is_frozen_and_slotted() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 1  # type: ignore[misc]
    assert not hasattr(policy, "__dict__")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"base": -1.0}, {"cap": -1.0}, {"jitter": "half"}],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_same_seed_same_waits() -> None:
    policy = RetryPolicy()
    err = ServerError("x", status=500)
    a = [policy.decide(err, n, random.Random(9)) for n in range(1, 6)]
    b = [policy.decide(err, n, random.Random(9)) for n in range(1, 6)]
    assert a == b


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0.0, max_value=100.0),
    cap=st.floats(min_value=0.0, max_value=1000.0),
    jitter=st.sampled_from(["full", "none"]),
    max_attempts=st.integers(min_value=1, max_value=50),
    retry_after=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e6)),
    kind=st.integers(min_value=0, max_value=len(FINAL_ERRORS) + 4),
    seed=st.integers(),
)
def test_waits_are_bounded_and_final_errors_never_retried(
    attempt: int,
    base: float,
    cap: float,
    jitter: str,
    max_attempts: int,
    retry_after: float | None,
    kind: int,
    seed: int,
) -> None:
    policy = RetryPolicy(
        max_attempts=max_attempts, base=base, cap=cap, jitter=jitter,  # type: ignore[arg-type]
        rate_limited_attempts=max_attempts,
    )
    errors = retryable_errors(retry_after) + FINAL_ERRORS
    error = errors[kind % len(errors)]
    wait = policy.decide(error, attempt, random.Random(seed))
    if not error.retryable or attempt >= max_attempts:
        assert wait is None
        return
    assert wait is not None
    ceiling = cap
    if isinstance(error, RateLimited) and error.retry_after is not None:
        ceiling = max(cap, min(error.retry_after, policy.max_retry_after))
        assert wait >= min(error.retry_after, policy.max_retry_after)
    assert 0.0 <= wait <= ceiling


# -- the loop ------------------------------------------------------------------


@pytest.mark.anyio
async def test_retrying_waits_what_the_decision_says_then_returns() -> None:
    clock = FakeClock()
    outcomes: list[Exception | str] = [TransportError("reset"), ServerError("boom", status=500),
                                       "ok"]
    counted: list[float] = []
    retried: list[tuple[str, int, float]] = []

    async def attempt() -> str:
        counted.append(clock.now())
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async with clock.autojump():
        result = await retrying(attempt, lambda err, made: 2.0 * made, clock=clock,
                                before=lambda: None,
                                on_retry=lambda err, made, wait: retried.append(
                                    (err.code, made, wait)))
    assert result == "ok"
    assert counted == [0.0, 2.0, 6.0]  # waited 2 s after the first failure, 4 s after the second
    assert retried == [("transportError", 1, 2.0), ("serverError", 2, 4.0)]


@pytest.mark.anyio
async def test_retrying_gives_up_when_told_and_never_retries_other_errors() -> None:
    clock = FakeClock()
    calls: list[int] = []

    async def failing() -> None:
        calls.append(1)
        raise ServerError("boom", status=500)

    with pytest.raises(ServerError):
        await retrying(failing, lambda err, made: 0.0 if made < 3 else None, clock=clock,
                       before=lambda: None)
    assert len(calls) == 3

    async def broken() -> None:
        calls.append(1)
        raise ValueError("not an API error")

    with pytest.raises(ValueError):
        await retrying(broken, lambda err, made: 0.0, clock=clock)
    assert len(calls) == 4

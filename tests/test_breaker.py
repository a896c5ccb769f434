"""The API circuit breaker on the fake clock: outages pause, they fail nothing."""

from __future__ import annotations

import anyio
import pytest
from fakeclock import FakeClock, settle
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.breaker import BreakerState, CircuitBreaker
from batcher.errors import ApiUnavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def fail(breaker: CircuitBreaker, key: str) -> None:
    async with breaker.request(key) as verdict:
        verdict.unreachable()


async def succeed(breaker: CircuitBreaker, key: str) -> None:
    async with breaker.request(key) as verdict:
        verdict.answered()


async def test_one_request_failing_again_and_again_does_not_open_it() -> None:
    breaker = CircuitBreaker(FakeClock(), host="api.test", threshold=3)
    for _ in range(10):
        await fail(breaker, "same-row")
    assert breaker.state is BreakerState.CLOSED


async def test_failures_of_different_requests_open_it_and_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(FakeClock(), host="api.test", threshold=3)
    await fail(breaker, "a")
    await fail(breaker, "b")
    await succeed(breaker, "c")
    await fail(breaker, "d")
    await fail(breaker, "e")
    assert breaker.state is BreakerState.CLOSED
    await fail(breaker, "f")
    assert breaker.state is BreakerState.OPEN
    assert breaker.opened == 1


async def test_while_open_nobody_sends_then_one_probe_and_its_answer_wakes_all() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock, host="api.test", threshold=2, backoff=1.0)
    await fail(breaker, "a")
    await fail(breaker, "b")
    sent: list[tuple[str, float]] = []
    verdicts = {"r0": "unreachable", "r1": "answered", "r2": "answered", "r3": "answered"}

    async def caller(name: str) -> None:
        async with breaker.request(name) as verdict:
            sent.append((name, clock.now()))
            if verdicts[name] == "answered":
                verdict.answered()
            else:
                verdict.unreachable()

    async with anyio.create_task_group() as tg:
        for name in ("r0", "r1", "r2", "r3"):
            tg.start_soon(caller, name)
        await settle()
        assert sent == []  # open: nobody sends
        await clock.advance_to(1.0)
        # One probe (r0) went out at t=1 and failed: the backoff doubles.
        assert sent == [("r0", 1.0)]
        assert breaker.state is BreakerState.OPEN
        await clock.advance_to(2.9)
        assert len(sent) == 1
        await clock.advance_to(3.0)
        # The second probe answered: everyone else goes at once.
    assert [name for name, _ in sent] == ["r0", "r1", "r2", "r3"]
    assert all(t == 3.0 for _, t in sent[1:])
    assert breaker.state is BreakerState.CLOSED
    assert breaker.paused_seconds == pytest.approx(3.0)


async def test_an_outage_longer_than_the_patience_halts_resumably() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock, host="api.test", threshold=1, backoff=1.0,
                             max_backoff=4.0, patience=10.0)
    await fail(breaker, "a")
    failures = 0
    halted: list[ApiUnavailable] = []
    halted_at: list[float] = []

    async def prober() -> None:
        nonlocal failures
        try:
            while True:
                async with breaker.request("probe") as verdict:
                    failures += 1
                    verdict.unreachable()
        except ApiUnavailable as err:
            halted.append(err)
            halted_at.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(prober)
        await clock.advance_to(30.0)
    [err] = halted
    assert err.host == "api.test" and err.halts_run
    assert "api.test" in str(err) and "run the same command again" in str(err)
    assert halted_at == [10.0]  # at the patience, not at the next probe
    # Probes at 1, 3, 7 (backoff 1, 2, 4), then capped at 4: 11 is past patience.
    assert failures == 3


async def test_a_probe_without_verdict_hands_the_probe_on() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock, host="api.test", threshold=1, backoff=1.0)
    await fail(breaker, "a")
    await clock.advance_to(1.0)
    async with breaker.request("cancelled"):
        pass  # no verdict (e.g. cancelled before an answer)
    assert breaker.state is BreakerState.OPEN
    with anyio.fail_after(1):
        await succeed(breaker, "next")  # probes at once, no new wait
    assert breaker.state is BreakerState.CLOSED


async def test_repr_names_the_host_and_state_only() -> None:
    breaker = CircuitBreaker(FakeClock(), host="api.test")
    assert repr(breaker) == ("CircuitBreaker(host='api.test', state=closed, "
                             "failures=0/5, outages=0)")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.booleans()), max_size=40))
def test_closed_until_threshold_distinct_failures_without_success(
    events: list[tuple[str, bool]],
) -> None:
    """A model of the closed state: the breaker opens exactly when the set of
    distinct keys failed since the last success reaches the threshold."""

    async def main() -> None:
        breaker = CircuitBreaker(FakeClock(), host="h", threshold=3)
        failed: set[str] = set()
        for key, ok in events:
            if breaker.state is not BreakerState.CLOSED:
                break
            await (succeed if ok else fail)(breaker, key)
            failed = set() if ok else failed | {key}
            expect = BreakerState.OPEN if len(failed) >= 3 else BreakerState.CLOSED
            assert breaker.state is expect

    anyio.run(main, backend="asyncio")

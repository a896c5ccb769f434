"""The poller: one heap, due times, learning from completions."""

from __future__ import annotations

import random
import time

import anyio
import pytest

from batcher.clock import SystemClock
from batcher.run.poll import DelayModel, Poller, PollItem


def test_first_poll_waits_the_interval_until_durations_are_learned() -> None:
    model = DelayModel(2.0, rng=random.Random(1))
    assert 2.0 <= model.first() <= 2.0 * 1.2  # jittered, never earlier
    for seconds in (3.0, 3.2, 3.4, 3.1, 3.3, 3.5):
        model.observe(seconds)
    # Learned: most generations take ~3.5 s, so the first poll waits that long.
    assert 3.3 <= model.first() <= 3.5 * 1.2


def test_first_poll_never_earlier_than_the_interval() -> None:
    model = DelayModel(5.0)
    for _ in range(10):
        model.observe(1.0)
    assert all(5.0 <= model.first() <= 6.0 for _ in range(20))


def test_waits_grow_and_are_capped() -> None:
    model = DelayModel(1.0, cap=4.0, rng=random.Random(2))
    item = PollItem("r", "g", "p", submitted_at=0.0)
    waits = []
    for polls in range(1, 10):
        item.polls = polls
        item.delay = model.next(item)
        waits.append(item.delay)
    assert waits[0] < waits[3]
    assert max(waits) <= 4.0 * 1.1


@pytest.mark.anyio
async def test_poller_polls_each_item_until_done_then_returns() -> None:
    calls: dict[str, int] = {}

    async def check(item: PollItem) -> bool:
        calls[item.row_id] = calls.get(item.row_id, 0) + 1
        return calls[item.row_id] >= 3

    poller = Poller(check, DelayModel(0.01, cap=0.02), clock=SystemClock(), workers=4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        for i in range(50):
            poller.add(PollItem(f"r{i}", f"g{i}", None, submitted_at=time.monotonic()))
        poller.close()
    assert calls == {f"r{i}": 3 for i in range(50)}
    assert len(poller) == 0


@pytest.mark.anyio
async def test_due_order_is_respected() -> None:
    seen: list[str] = []

    async def check(item: PollItem) -> bool:
        seen.append(item.row_id)
        return True

    poller = Poller(check, DelayModel(0.0), clock=SystemClock(), workers=1)
    poller.add(PollItem("late", "g1", None, 0.0), due_in=0.2)
    poller.add(PollItem("early", "g2", None, 0.0), due_in=0.05)
    poller.add(PollItem("now", "g3", None, 0.0), due_in=0.0)
    poller.close()
    with anyio.fail_after(5):
        await poller.run()
    assert seen == ["now", "early", "late"]


def test_once_learned_the_next_poll_aims_at_the_learned_duration() -> None:
    model = DelayModel(0.5, rng=random.Random(3))
    for seconds in (3.0, 3.1, 3.2, 2.9, 3.0, 3.05):
        model.observe(seconds)
    item = PollItem("r", "g", "p", submitted_at=100.0, polls=1, delay=0.5)
    # Polled 0.5 s after submission and not done: wait until ~3.1 s, not 0.5 s.
    wait = model.next(item, now=100.5)
    assert 2.3 <= wait <= 2.9
    # Past the learned duration: a short floor, not another long wait.
    late = model.next(PollItem("r", "g", "p", submitted_at=100.0, polls=2, delay=0.5),
                      now=104.0)
    assert late < 1.0


def test_before_anything_is_learned_waits_double() -> None:
    model = DelayModel(1.0, rng=random.Random(4))
    item = PollItem("r", "g", "p", submitted_at=0.0, polls=1, delay=1.0)
    assert 1.8 <= model.next(item, now=1.0) <= 2.2

"""SharedRateGate: several hosts under one --rate, on real ledgers and the real clock.

Every test drives real gates on a real shared ledger: a shared MemoryLedger
(hosts are its connections, in this process), PostgreSQL with one
PostgresLedger per host (its own connections), and PostgreSQL with one
process per host. Callers acquire as fast as the gates let them and note
when (``time.monotonic``, one clock for every process of this machine); the
assertion is the contract's: no one-second window ever holds more than
``--rate`` grants of all hosts together, and the hosts together get close to
the rate.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from batcher.clock import SystemClock
from batcher.ledger import MemoryLedger, PostgresLedger
from batcher.ledger.base import LeasingLedger
from batcher.model import RunInfo
from batcher.ratelimit import RateGate
from batcher.ratelimit_shared import SharedRateGate

CALLERS = 8  # concurrent callers per host, as --concurrency would make


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def run_info(name: str) -> RunInfo:
    return RunInfo(name, os.getpid(), socket.gethostname(), time.time(), "pytest")


def max_in_window(times: Sequence[float], width: float = 1.0) -> int:
    """Most grants in any closed window ``[t, t + width]``."""
    ts = sorted(times)
    best = j = 0
    for i in range(len(ts)):
        while j < len(ts) and ts[j] - ts[i] <= width:
            j += 1
        best = max(best, j - i)
    return best


def efficiency(times: Sequence[float], rate: float) -> float:
    """Grants per second between the first and the last grant, over the rate."""
    ts = sorted(times)
    return (len(ts) - 1) / (ts[-1] - ts[0]) / rate


async def hammer(gates: Sequence[SharedRateGate], seconds: float) -> list[list[float]]:
    """Every gate's callers acquire for ``seconds``; each gate's grant times."""
    times: list[list[float]] = [[] for _ in gates]

    async def caller(gate: SharedRateGate, into: list[float]) -> None:
        while True:
            await gate.acquire()
            into.append(time.monotonic())

    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:
            for gate, into in zip(gates, times, strict=True):
                for _ in range(CALLERS):
                    tg.start_soon(caller, gate, into)
    return times


def test_the_shared_gate_offers_everything_the_rate_gate_does() -> None:
    public = {n for n in dir(RateGate) if not n.startswith("_")}
    assert public <= {n for n in dir(SharedRateGate) if not n.startswith("_")}
    for name in ("acquire", "on_rate_limited", "set_rate", "paused_for", "has_capacity"):
        assert inspect.signature(getattr(RateGate, name)).parameters.keys() == (
            inspect.signature(getattr(SharedRateGate, name)).parameters.keys()
        ), name


# -- in one process, on a shared memory ledger ------------------------------------


@pytest.fixture
async def memory_hosts() -> AsyncIterator[list[LeasingLedger]]:
    first = MemoryLedger(shared=True)
    hosts = [first, first.connect(), first.connect()]
    for i, led in enumerate(hosts):
        await led.open(run_info(f"host-{i}"))
    yield hosts
    for led in hosts:
        await led.close(0)


@pytest.mark.anyio
async def test_hosts_on_a_shared_memory_ledger_keep_the_sum_under_the_rate(
    memory_hosts: list[LeasingLedger],
) -> None:
    gates = [SharedRateGate(led, 20, clock=SystemClock()) for led in memory_hosts]
    times = await hammer(gates, 1.6)
    every = [t for ts in times for t in ts]
    assert max_in_window(every) <= 20
    assert all(times), "a host got nothing"
    assert efficiency(every, 20) > 0.8


@pytest.mark.anyio
async def test_a_429_on_one_host_pauses_and_slows_every_host(
    memory_hosts: list[LeasingLedger],
) -> None:
    a, b = (SharedRateGate(led, 10, clock=SystemClock()) for led in memory_hosts[:2])
    times = [[], []]  # type: list[list[float]]
    hit: list[float] = []

    async def caller(gate: SharedRateGate, into: list[float]) -> None:
        while True:
            await gate.acquire()
            into.append(time.monotonic())

    async def rate_limited() -> None:
        await anyio.sleep(0.6)
        hit.append(time.monotonic())
        a.on_rate_limited(1.0)  # the server said: wait a second

    with anyio.move_on_after(3.0):
        async with anyio.create_task_group() as tg:
            for gate, into in ((a, times[0]), (b, times[1])):
                for _ in range(4):
                    tg.start_soon(caller, gate, into)
            tg.start_soon(rate_limited)
    t429 = hit[0]
    # a stops at once; b after the block of slots it held (0.25 s of 10/s: 2)
    assert not [t for t in times[0] if t429 < t < t429 + 1.0]
    assert len([t for t in times[1] if t429 < t < t429 + 1.0]) <= 2
    # halved for the whole job, growing back by 10/20 per second since the pause
    assert 5 <= a.current_rate < 7 and 5 <= b.current_rate < 7
    after = sorted(t for ts in times for t in ts if t > t429 + 1.0)
    assert len(after) >= 3
    assert min(y - x for x, y in itertools.pairwise(after)) >= 1.04 / 7 - 0.01


@pytest.mark.anyio
async def test_a_new_rate_reaches_every_host(memory_hosts: list[LeasingLedger]) -> None:
    a, b = (SharedRateGate(led, 50, clock=SystemClock()) for led in memory_hosts[:2])
    await a.acquire()
    await b.acquire()
    a.set_rate(4)
    await a.acquire()  # its next claim carries the new rate
    with anyio.fail_after(2):
        while b.current_rate != 4:
            await b.acquire()
    assert b.rate == 50  # b's own setting stands; the ledger's pace follows the last set


@pytest.mark.anyio
async def test_callers_wait_while_the_ledger_is_unreachable_and_go_on_after() -> None:
    ledger = MemoryLedger(shared=True)
    gate = SharedRateGate(ledger, 100, clock=SystemClock())
    # the ledger is not open: every claim fails
    with anyio.move_on_after(0.6) as waited:
        await gate.acquire()
    assert waited.cancelled_caught and gate.granted == 0  # never unpaced
    await ledger.open(run_info("late"))
    try:
        with anyio.fail_after(6):  # the retry waits grow: 0.25, 0.5, 1, 2 s
            await gate.acquire()
        assert gate.granted == 1
    finally:
        await ledger.close(0)


# -- PostgreSQL -----------------------------------------------------------------------


# Each case takes seconds of real time: the fast tier keeps the busiest.
HOSTS_AND_RATES = [pytest.param(2, 1, marks=pytest.mark.slow),
                   pytest.param(3, 1, marks=pytest.mark.slow),
                   pytest.param(2, 10, marks=pytest.mark.slow), (4, 50)]


def _seconds(rate: float) -> float:
    return 5.2 if rate < 5 else 3.0


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize(("hosts", "rate"), HOSTS_AND_RATES)
async def test_hosts_on_postgresql_never_pass_the_rate_together(
    pg_url: str, hosts: int, rate: int
) -> None:
    ledgers = [PostgresLedger(pg_url) for _ in range(hosts)]
    for i, led in enumerate(ledgers):
        await led.open(run_info(f"host-{i}"))
    try:
        gates = [SharedRateGate(led, rate, clock=SystemClock()) for led in ledgers]
        times = await hammer(gates, _seconds(rate))
    finally:
        for led in ledgers:
            await led.close(0)
    every = [t for ts in times for t in ts]
    assert max_in_window(every) <= rate, sorted(every)
    measured = efficiency(every, rate)
    claims = sum(g.claims for g in gates) / max(1, len(every))
    print(f"\n{hosts} hosts, rate {rate}: {len(every)} grants, efficiency {measured:.3f}, "
          f"{claims:.2f} claims per grant, wasted {sum(g.wasted for g in gates)}")
    assert measured > 0.85
    if rate >= 10:
        assert all(times), "a host got nothing"
        assert claims < 0.6  # blocks of slots, not a round trip per request


CHILD = r"""
import asyncio, json, os, socket, sys, time
import anyio
from batcher.clock import SystemClock
from batcher.ledger import PostgresLedger
from batcher.model import RunInfo
from batcher.ratelimit_shared import SharedRateGate

async def main(url, rate, seconds, callers):
    led = PostgresLedger(url)
    await led.open(RunInfo(f"child-{os.getpid()}", os.getpid(), socket.gethostname(),
                           time.time(), "pace"))
    gate = SharedRateGate(led, float(rate), clock=SystemClock())
    print("ready", flush=True)
    start = float(sys.stdin.readline())  # every host starts at the same moment
    await anyio.sleep(max(0.0, start - time.monotonic()))
    times = []

    async def caller():
        while True:
            await gate.acquire()
            times.append(time.monotonic())

    with anyio.move_on_after(float(seconds)):
        async with anyio.create_task_group() as tg:
            for _ in range(int(callers)):
                tg.start_soon(caller)
    await led.close(0)
    print(json.dumps({"times": times, "claims": gate.claims}), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize(("hosts", "rate"), HOSTS_AND_RATES)
def test_host_processes_on_postgresql_never_pass_the_rate_together(
    pg_url: str, hosts: int, rate: int
) -> None:
    # The schema and its pace exist before the hosts race to open it.
    async def create() -> None:
        led = PostgresLedger(pg_url)
        await led.open(run_info("setup"))
        await led.close(0)

    asyncio.run(create())
    seconds = _seconds(rate)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, pg_url, str(rate), str(seconds), str(CALLERS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(hosts)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        start = time.monotonic() + 0.3
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 30)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    every = [t for r in results for t in r["times"]]
    assert max_in_window(every) <= rate, sorted(every)
    measured = efficiency(every, rate)
    print(f"\n{hosts} processes, rate {rate}: {len(every)} grants, efficiency {measured:.3f}, "
          f"{sum(r['claims'] for r in results) / len(every):.2f} claims per grant")
    assert measured > 0.85
    assert math.isfinite(measured)

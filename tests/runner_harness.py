"""The in-process runner harness: a job's folder, manifest, simulator and memory ledger
on one fake clock (used by tests/test_runner.py and tests/test_uploads.py).

Every job builds the real :class:`~batcher.run.Runner` over a
:class:`~batcher.ledger.MemoryLedger`, a real :class:`~batcher.client.DiffioClient`
and the simulator's aiohttp app served in this process on an ephemeral
loopback port, all reading one :class:`FakeClock` that jumps ahead whenever
every task waits.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
from fakeclock import FakeClock

from batcher.bandwidth import Bandwidth
from batcher.breaker import Breakers
from batcher.client import DiffioClient
from batcher.ledger import MemoryLedger
from batcher.model import RunInfo
from batcher.ratelimit_shared import gate_for
from batcher.run import Runner, RunResult
from batcher.run.stats import RunStats
from batcher.settings import DEFAULT_MODEL, Settings
from batcher.simulator import ApiGeneration, SimConfig, Simulator, run_config, run_simulator
from batcher.transport import HttpSessions

KEY = "sim-key"
# Inside one monthly billing period of the simulator's wall clock.
T0 = 1_790_000_000.0


@dataclass
class Job:
    """One job's folder, manifest, simulator and ledger, on one fake clock."""

    folder: Path
    manifest: Path
    clock: FakeClock
    sim: Simulator
    ledger: MemoryLedger
    model: str = DEFAULT_MODEL

    def settings(self, **changes: Any) -> Settings:
        base = Settings(manifest=self.manifest, ledger=":memory:", out=self.folder / "out",
                        model=self.model, rate=20.0, concurrency=4, poll_interval=2.0,
                        timeout=30.0)
        return replace(base, **changes)

    async def run(self, *, key: str = KEY, ledger: Any = None,
                  stop_when: Callable[[], bool] | None = None, base_url: str | None = None,
                  breakers: Breakers | None = None, **changes: Any
                  ) -> RunResult | None:
        """One run to its end; None when ``stop_when`` came true first and it was cancelled.

        ``base_url`` replaces the simulator's (a proxy in front of it);
        ``breakers`` are the client's circuit breakers (None: none).
        """
        settings = self.settings(**changes)
        ledger = ledger if ledger is not None else self.ledger
        stats = RunStats()
        gate = gate_for(ledger, settings.rate, clock=self.clock)
        cap = anyio.CapacityLimiter(settings.concurrency)
        assert self.sim.base_url is not None
        async with HttpSessions() as http:
            client = DiffioClient(http, base_url or self.sim.base_url, key, gate=gate,
                                  cap=cap, timeout=settings.timeout,
                                  on_request=stats.on_request,
                                  bandwidth=Bandwidth(settings.max_bandwidth),
                                  breakers=breakers)
            runner = Runner(settings, ledger, client, gate=gate, clock=self.clock,
                            rng=random.Random(7), stats=stats, wall=self.clock,
                            run_info=RunInfo.start("test"))
            if stop_when is None:
                return await runner.run()
            result: RunResult | None = None
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await until(stop_when)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                result = await runner.run()
                tg.cancel_scope.cancel()
            return result

    async def stage_counts(self) -> dict[str, int]:
        return {stage.value: n for stage, n in (await self.ledger.counts()).items()}

    async def rows(self) -> list[Any]:
        return [row async for row in self.ledger.rows()]


async def until(predicate: Callable[[], bool]) -> None:
    """Return once ``predicate()`` is true, checking every half millisecond of real time."""
    while True:
        if predicate():
            return
        await anyio.sleep(0.0005)


@asynccontextmanager
async def job_maker(tmp_path: Path, *, model: str = DEFAULT_MODEL, grace: float = 0.0005
                    ) -> AsyncIterator[Callable[..., Awaitable[Job]]]:
    """``job = await make(manifest_text, sim_config, shared=False, api=None)``: the
    simulator serves in this process until the block ends, and the clock
    autojumps. It serves the API generation that serves ``model``, as ``run
    --simulate`` picks it, unless ``api`` names one. ``grace``: real seconds the
    clock lets I/O on its way arrive before it jumps (more for runs where
    everyone waits on one request through a proxy, as a breaker's probe)."""
    clock = FakeClock(T0)
    async with clock.autojump(grace), anyio.create_task_group() as tg:
        stops: list[anyio.Event] = []

        async def make(text: str, config: SimConfig | None = None, *,
                       shared: bool = False, api: ApiGeneration | None = None) -> Job:
            manifest = tmp_path / "m.csv"
            manifest.write_text(text)
            # The API generation that serves the model, as run --simulate picks.
            cfg = run_config(config or SimConfig(duration=(3.0, 9.0)), model)
            if api is not None:
                cfg = replace(cfg, api=api)
            ready: list[Simulator] = []
            started = anyio.Event()
            stop = anyio.Event()
            stops.append(stop)

            async def serve() -> None:
                async with run_simulator(cfg, clock=clock, wall=clock) as sim:
                    ready.append(sim)
                    started.set()
                    await stop.wait()

            tg.start_soon(serve)
            await started.wait()
            ledger = MemoryLedger(wall=clock, shared=shared)
            await ledger.open(RunInfo.start("test"))
            return Job(tmp_path, manifest, clock, ready[0], ledger, model)

        yield make
        for stop in stops:
            stop.set()

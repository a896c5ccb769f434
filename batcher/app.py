"""Wiring one run: ledger, simulator (optional), HTTP session, client, runner.

The CLI and the Python API both come through :func:`run_job`; tests can pass
their own ledger, clock or random source.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import sys
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import anyio

from .client import DiffioClient, normalize_base_url
from .clock import Clock, SystemClock
from .ledger import open_ledger
from .ledger.base import Ledger, RunInfo
from .ratelimit import RateGate
from .runner import Runner, RunResult
from .runstats import RunStats
from .settings import Settings

__all__ = ["SIM_KEY", "run_job"]

log = logging.getLogger(__name__)

# The key the in-process simulator accepts when the user gave none.
SIM_KEY = "sim-key"


def _run_info() -> RunInfo:
    return RunInfo(
        run_id=uuid.uuid4().hex,
        pid=os.getpid(),
        host=socket.gethostname(),
        started_at=time.time(),
        command=" ".join(sys.argv[1:])[:500],
    )


async def run_job(
    settings: Settings,
    *,
    sim_config: Any = None,
    ledger: Ledger | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    stats: RunStats | None = None,
    progress: bool = True,
    cancel_scope: anyio.CancelScope | None = None,
    interrupted: list[int] | None = None,
) -> RunResult:
    """Run (or dry-run) one job and return its result.

    Raises LedgerLocked when another run holds the ledger, ConfigError or
    ManifestError before anything is sent. Cancellation (a signal) leaves the
    ledger closed and consistent, and propagates.
    """
    ledger = ledger or open_ledger(settings.ledger)
    stats = stats or RunStats()
    await ledger.open(_run_info(), lock=True)
    exit_code: int | None = None
    try:
        if settings.dry_run:
            from .plan import make_plan

            result = await make_plan(settings, ledger, stats)
        else:
            result = await _run(settings, ledger, stats, sim_config=sim_config, clock=clock,
                                rng=rng, progress=progress)
        exit_code = result.exit_code
        return result
    except anyio.get_cancelled_exc_class():
        exit_code = 130
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close(exit_code)
            if settings.report is not None or settings.metrics is not None:
                from .report import write_outputs

                write_outputs(settings, stats, exit_code)


async def _run(
    settings: Settings,
    ledger: Ledger,
    stats: RunStats,
    *,
    sim_config: Any,
    clock: Clock | None,
    rng: random.Random | None,
    progress: bool,
) -> RunResult:
    clock = clock or SystemClock()
    async with AsyncExitStack() as stack:
        base: str = settings.api_base
        key: str = settings.api_key
        if settings.simulate:
            from .simulator import KeySpec, SimConfig, run_simulator

            cfg = sim_config if sim_config is not None else SimConfig()
            key = key or SIM_KEY
            keys = dict(cfg.api_keys)
            keys.setdefault(key, KeySpec())
            cfg = dataclasses.replace(cfg, auto_create_projects=True, api_keys=keys)
            sim = await stack.enter_async_context(run_simulator(cfg))
            base = str(sim.base_url)
            print(f"batcher: running against the embedded simulator at {base}",
                  file=sys.stderr, flush=True)
        connector = aiohttp.TCPConnector(limit=settings.concurrency + 8,
                                         limit_per_host=settings.concurrency + 8)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        gate = RateGate(settings.rate, clock=clock)
        cap = anyio.CapacityLimiter(settings.concurrency)
        client = DiffioClient(session, normalize_base_url(base), key, gate=gate, cap=cap,
                              timeout=settings.timeout, on_request=stats.on_request)
        runner = Runner(settings, ledger, client, gate=gate, clock=clock, rng=rng,
                        stats=stats)
        if not progress:
            return await runner.run()
        from .progress import ProgressReporter

        reporter = ProgressReporter(stats, every=settings.progress_every)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            try:
                result = await runner.run()
            finally:
                tg.cancel_scope.cancel()
                reporter.stop()
        return result

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
from .ledger.base import LeasingLedger, Ledger
from .model import RunInfo
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
    ledger: LeasingLedger | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    stats: RunStats | None = None,
    progress: str = "auto",
    cancel_scope: anyio.CancelScope | None = None,
    interrupted: list[int] | None = None,
) -> RunResult:
    """Run (or dry-run) one job and return its result.

    Raises LedgerLocked when another run holds the ledger, ConfigError or
    ManifestError before anything is sent. Cancellation (a signal) leaves the
    ledger closed and consistent, and propagates.
    """
    stats = stats or RunStats()
    if settings.dry_run:
        return await _dry_run(settings, ledger, stats)
    ledger = ledger or open_ledger(settings.ledger)
    info = _run_info()
    await ledger.open(info, lock=True)
    exit_code: int | None = None
    result: RunResult | None = None
    try:
        if True:
            result = await _run(settings, ledger, stats, sim_config=sim_config, clock=clock,
                                rng=rng, progress=progress, info=info)
        exit_code = result.exit_code
        return result
    except anyio.get_cancelled_exc_class():
        exit_code = 130
        raise
    finally:
        with anyio.CancelScope(shield=True):
            counts = result.counts if result is not None else None
            if counts is None and (settings.report is not None or settings.metrics is not None):
                counts = await _counts(ledger)
            await ledger.close(exit_code)
            if settings.report is not None or settings.metrics is not None:
                from .report import write_outputs

                write_outputs(settings, stats, exit_code, counts)


async def _counts(ledger: Ledger) -> dict[str, int] | None:
    from .model import contract_status

    try:
        by_stage = await ledger.counts()
    except Exception:  # the report must not hide the run's own error
        log.exception("report.counts_failed")
        return None
    counts = {"pending": 0, "submitted": 0, "complete": 0, "failed": 0}
    for stage, n in by_stage.items():
        counts[contract_status(stage)] += n
    return counts


async def _dry_run(settings: Settings, ledger: Ledger | None, stats: RunStats) -> RunResult:
    """The plan, compared with the ledger read-only; nothing is created or recorded."""
    from .ledger.memory import MemoryLedger
    from .plan import make_plan

    url = settings.ledger
    if ledger is None:
        exists = "://" in url or await anyio.Path(url).exists()
        ledger = open_ledger(url) if exists else MemoryLedger()
    await ledger.open(_run_info(), lock=False)
    try:
        return await make_plan(settings, ledger, stats)
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close(None)


async def _run(
    settings: Settings,
    ledger: LeasingLedger,
    stats: RunStats,
    *,
    sim_config: Any,
    clock: Clock | None,
    rng: random.Random | None,
    progress: str,
    info: RunInfo,
) -> RunResult:
    clock = clock or SystemClock()
    async with AsyncExitStack() as stack:
        base: str = settings.api_base
        key: str = settings.api_key
        if settings.simulate:
            from .simulator import KeySpec, run_config, run_simulator

            # The API generation that serves the run's model (--sim-config may be a mapping).
            cfg = run_config(sim_config, settings.model)
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
                        stats=stats, run_info=info)
        if progress == "off":
            return await runner.run()
        from .progress import ProgressReporter

        reporter = ProgressReporter(stats, every=settings.progress_every,
                                    json=progress == "json")
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            try:
                result = await runner.run()
            finally:
                tg.cancel_scope.cancel()
                reporter.stop()
        return result

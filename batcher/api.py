"""The Python API for orchestrators (Airflow, Prefect, Dagster, plain scripts),
and the wiring of one run that the command line shares with it.

    from batcher import run_manifest
    result = run_manifest("catalog.csv", rate=20, simulate=True)
    assert result.exit_code == 0, result.summary()

:func:`run_job` wires one run: the ledger, the embedded simulator (with
``simulate``), the HTTP session, the rate gate, the client and the runner.
``batcher run`` and the functions here all come through it; tests can pass
their own ledger, clock or random source.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from .bandwidth import Bandwidth
from .breaker import BreakerConfig, Breakers
from .client import DiffioClient, normalize_base_url
from .clock import Clock, SystemClock
from .errors import LedgerError, exit_code_for, find_error
from .ledger import open_ledger
from .ledger.base import Ledger
from .ledger.patient import patient
from .model import RunInfo, status_counts
from .ops.logs import LEDGER_CLOSE_FAILED, REPORT_COUNTS_FAILED, event
from .ratelimit_shared import gate_for
from .run import Runner, RunResult
from .run.stats import RunStats
from .settings import OPTION_SPECS, Settings, resolve
from .transport import HttpSessions

__all__ = ["SIM_KEY", "make_settings", "run_job", "run_manifest", "run_manifest_async"]

log = logging.getLogger(__name__)

# The key the in-process simulator accepts when the user gave none.
SIM_KEY = "sim-key"

_NAMES = {spec.name for spec in OPTION_SPECS if spec.name != "manifest"}


# ---------------------------------------------------------------- the Python API


def make_settings(
    source: str | Path,
    *,
    api_key: str | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
    simulate: bool = False,
    env: Mapping[str, str] | None = None,
    **options: Any,
) -> Settings:
    """Settings as ``batcher run SOURCE`` would build them; options as keywords.

    Keyword options are the run flags' names in snake case (``rate=20``,
    ``poll_interval=2``, ``out="restored"``); they take precedence over the
    environment and the job file, as flags do.
    """
    unknown = sorted(set(options) - _NAMES)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}")
    environ = dict(os.environ if env is None else env)
    if api_key is not None:
        environ["DIFFIO_API_KEY"] = api_key
    return resolve(source=Path(source), flags=options, env=environ,
                   retry_failed=retry_failed, dry_run=dry_run, simulate=simulate)


async def run_manifest_async(source: str | Path | Settings, *, sim_config: Any = None,
                             **kwargs: Any) -> RunResult:
    """Run a job on the current event loop (asyncio); see :func:`run_manifest`."""
    settings = source if isinstance(source, Settings) else make_settings(source, **kwargs)
    return await run_job(settings, sim_config=sim_config, progress="off")


def run_manifest(source: str | Path | Settings, **kwargs: Any) -> RunResult:
    """Run (or resume) a job to its end and return its result.

    ``result.exit_code`` follows the CLI's exit codes (0 all complete, 1 some
    failed, 3 halted and resumable); ``result.summary()`` gives plain values.
    Raises LedgerLocked if another run holds the ledger, ConfigError or
    ManifestError before anything is sent. With ``simulate=True``,
    ``sim_config`` (a mapping of the simulator's knobs, as in a
    ``--sim-config`` file, or a ``SimConfig``) shapes the embedded simulator.
    """
    return anyio.run(lambda: run_manifest_async(source, **kwargs), backend="asyncio")


# ---------------------------------------------------------------- the wiring


async def run_job(
    settings: Settings,
    *,
    sim_config: Any = None,
    ledger: Ledger | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    stats: RunStats | None = None,
    progress: str = "auto",
) -> RunResult:
    """Run (or dry-run) one job and return its result.

    ``progress`` is ``auto`` (a bar on a terminal, lines off it), ``json``
    or ``off``. Raises LedgerLocked when another run holds the ledger,
    ConfigError or ManifestError before anything is sent. Cancellation (a
    signal) leaves the ledger closed and consistent, and propagates.
    """
    stats = stats or RunStats()
    info = RunInfo.start(" ".join(sys.argv[1:]))
    if settings.dry_run:
        return await _dry_run(settings, ledger, stats, info)
    # Outages of the ledger's database are waited out (up to the patience).
    ledger = patient(ledger or open_ledger(settings.ledger), clock=clock or SystemClock(),
                     patience=settings.outage_patience)
    await ledger.open(info, lock=True)
    exit_code: int | None = None
    result: RunResult | None = None
    try:
        result = await _run(settings, ledger, stats, sim_config=sim_config, clock=clock,
                            rng=rng, progress=progress, info=info)
        exit_code = result.exit_code
        return result
    except anyio.get_cancelled_exc_class():
        exit_code = 130
        raise
    except Exception as exc:
        # Recorded in the ledger as the command line will exit.
        found = find_error(exc)
        if found is not None:
            exit_code = exit_code_for(found, sent=stats.total_requests > 0)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            counts = result.counts if result is not None else None
            if counts is None and (settings.report is not None or settings.metrics is not None):
                counts = await _counts(ledger)
            try:
                await ledger.close(exit_code)
            except LedgerError as err:
                # The run's own outcome stands; only its end time is not recorded.
                log.warning("could not record the run's end in the ledger: %s", err,
                            extra=event(LEDGER_CLOSE_FAILED, error=str(err)))
            if settings.report is not None or settings.metrics is not None:
                from .ops.report import write_outputs

                write_outputs(settings, stats, exit_code, counts)


async def _counts(ledger: Ledger) -> dict[str, int] | None:
    try:
        return status_counts(await ledger.counts())
    except Exception:  # the report must not hide the run's own error
        log.exception("could not count the ledger's rows for the report",
                      extra=event(REPORT_COUNTS_FAILED))
        return None


async def _dry_run(settings: Settings, ledger: Ledger | None, stats: RunStats,
                   info: RunInfo) -> RunResult:
    """The plan, compared with the ledger read-only; nothing is created or recorded."""
    from .ledger.memory import MemoryLedger
    from .ops.dryrun import make_plan

    url = settings.ledger
    if ledger is None:
        exists = "://" in url or await anyio.Path(url).exists()
        ledger = open_ledger(url) if exists else MemoryLedger()
    await ledger.open(info, lock=False)
    try:
        return await make_plan(settings, ledger, stats)
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close(None)


async def _run(
    settings: Settings,
    ledger: Ledger,
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
        receiving = None
        if settings.webhook_listen is not None:
            from .run.receiving import receive_events

            receiving = await stack.enter_async_context(receive_events(settings, ledger, stats))
        if settings.simulate:
            from .simulator import KeySpec, Simulator, run_config, run_simulator

            # A [webhooks] table of --sim-config holds the sender's faults.
            sim_knobs = dict(sim_config) if isinstance(sim_config, Mapping) else sim_config
            hook_faults = sim_knobs.pop("webhooks", None) if isinstance(sim_knobs, dict) else None
            # The API generation that serves the run's model (--sim-config may be a mapping).
            cfg = run_config(sim_knobs, settings.model)
            key = key or SIM_KEY
            keys = dict(cfg.api_keys)
            keys.setdefault(key, KeySpec())
            cfg = dataclasses.replace(cfg, auto_create_projects=True, api_keys=keys)
            simulator = Simulator(cfg)
            if receiving is not None:
                from .run.receiving import simulated_events

                await stack.enter_async_context(
                    simulated_events(simulator, receiving, hook_faults, seed=cfg.seed))
            sim = await stack.enter_async_context(run_simulator(simulator))
            base = str(sim.base_url)
            print(f"batcher: running against the embedded simulator at {base}",
                  file=sys.stderr, flush=True)
        http = await stack.enter_async_context(HttpSessions(limit=settings.concurrency + 8))
        # On a shared ledger the gate draws from the job's one pace: the sum of
        # all hosts' requests never passes --rate.
        gate = gate_for(ledger, settings.rate, clock=clock)
        cap = anyio.CapacityLimiter(settings.concurrency)
        breakers = Breakers(clock, BreakerConfig(patience=settings.outage_patience))
        client = DiffioClient(http, normalize_base_url(base), key, gate=gate, cap=cap,
                              timeout=settings.timeout, on_request=stats.on_request,
                              bandwidth=Bandwidth(settings.max_bandwidth), breakers=breakers)
        runner = Runner(settings, ledger, client, gate=gate, clock=clock, rng=rng,
                        stats=stats, run_info=info, webhooks=settings.webhooks)
        if receiving is not None:
            assert runner.feed is not None
            receiving.sink.recorded = runner.feed.wake
        if progress == "off":
            return await runner.run()
        from .ops.progress import ProgressReporter

        reporter = ProgressReporter(stats, every=settings.progress_every,
                                    json=progress == "json", bandwidth=settings.max_bandwidth)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            try:
                result = await runner.run()
            finally:
                tg.cancel_scope.cancel()
                reporter.stop()
        return result

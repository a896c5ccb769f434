"""The Python API for orchestrators (Airflow, Prefect, Dagster, plain scripts).

    from batcher import run_manifest
    result = run_manifest("catalog.csv", rate=20, simulate=True)
    assert result.exit_code == 0, result.summary()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from .run import RunResult
from .settings import OPTION_SPECS, Settings, resolve

__all__ = ["make_settings", "run_manifest", "run_manifest_async"]

_NAMES = {spec.name for spec in OPTION_SPECS if spec.name != "manifest"}


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


async def run_manifest_async(source: str | Path | Settings, **kwargs: Any) -> RunResult:
    """Run a job on the current event loop (asyncio); see :func:`run_manifest`."""
    from .app import run_job

    settings = source if isinstance(source, Settings) else make_settings(source, **kwargs)
    return await run_job(settings, progress="off")


def run_manifest(source: str | Path | Settings, **kwargs: Any) -> RunResult:
    """Run (or resume) a job to its end and return its result.

    ``result.exit_code`` follows the CLI's exit codes (0 all complete, 1 some
    failed, 3 halted and resumable); ``result.summary()`` gives plain values.
    Raises LedgerLocked if another run holds the ledger, ConfigError or
    ManifestError before anything is sent.
    """
    return anyio.run(lambda: run_manifest_async(source, **kwargs), backend="asyncio")

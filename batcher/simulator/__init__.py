"""The embedded Diffio API simulator (``batcher simulate``, ``batcher run --simulate``).

An in-memory, aiohttp.web implementation of the seed-era Diffio API
(../shared/DIFFIO-API.md sections 1-5 and 7) with fault injection and the
counters batcher's own tests check (``SimStats``)::

    async with run_simulator(SimConfig(duration=(0.1, 0.2))) as sim:
        ...  # talk to sim.base_url with the key "sim-key"
        assert sim.stats.extra_charges == 0
"""

from __future__ import annotations

from batcher.simulator.app import Simulator
from batcher.simulator.audio import (
    project_source_bytes,
    restored_audio,
    restored_source_digest,
    wav_duration_seconds,
)
from batcher.simulator.config import DEFAULT_API_KEY, KeySpec, SimConfig
from batcher.simulator.server import run_simulator
from batcher.simulator.state import derived_generation_id
from batcher.simulator.stats import SimStats, logical_request_key

__all__ = [
    "DEFAULT_API_KEY",
    "KeySpec",
    "SimConfig",
    "SimStats",
    "Simulator",
    "derived_generation_id",
    "logical_request_key",
    "project_source_bytes",
    "restored_audio",
    "restored_source_digest",
    "run_simulator",
    "wav_duration_seconds",
]

"""The embedded Diffio API simulator (``batcher simulate``, ``batcher run --simulate``).

An in-memory, aiohttp.web implementation of the Diffio API in either of its
generations, on one port, with fault injection and the counters batcher's
own tests check (``SimStats``):

- ``api="current"`` (the default): diffio-4.6-flash/-pro (4.5 names are
  aliases), 410 ``model_retired`` for every other model, uploads in parts on
  the upload host under ``/edge`` with an upload token, then
  ``complete_project_upload`` before a generation may start;
- ``api="seed"``: diffio-3.5 (3.4 its alias) and the 2.0 models, one signed
  PUT per upload.

::

    async with run_simulator(SimConfig(duration=(0.1, 0.2))) as sim:
        ...  # talk to sim.base_url with the key "sim-key"
        assert sim.stats.extra_charges == 0

``api_for_model`` says which generation serves a model; ``run_config`` builds
the config ``batcher run --simulate`` uses. ``Simulator.add_observer`` is the
events hook: observers learn each new generation's planned status changes
(``timeline.py``).

Modules: ``app`` (the Simulator and its routes), ``routes`` (the /v1
dispatcher), ``endpoints`` (what each endpoint does), ``edge`` (the upload
host), ``uploads`` (sessions and multipart rules), ``storage`` (signed URLs),
``state`` (ownership, idempotency, billing), ``model`` (records and ageing),
``catalog`` (models per generation), ``views`` (answer shapes), ``timeline``
(the events hook), ``wire`` (JSON bodies, fault rolls), ``config``, ``stats``,
``billing``, ``window``, ``audio``, ``server`` and ``cli``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batcher.simulator.app import Simulator
    from batcher.simulator.audio import (
        project_source_bytes,
        restored_audio,
        restored_source_digest,
        wav_duration_seconds,
    )
    from batcher.simulator.catalog import CURRENT_MODELS, ApiGeneration, api_for_model
    from batcher.simulator.config import DEFAULT_API_KEY, KeySpec, SimConfig, run_config
    from batcher.simulator.server import run_simulator
    from batcher.simulator.state import derived_generation_id
    from batcher.simulator.stats import SimStats, logical_request_key
    from batcher.simulator.timeline import GenerationObserver, GenerationTimeline, StatusChange

__all__ = [
    "CURRENT_MODELS",
    "DEFAULT_API_KEY",
    "ApiGeneration",
    "GenerationObserver",
    "GenerationTimeline",
    "KeySpec",
    "SimConfig",
    "SimStats",
    "Simulator",
    "StatusChange",
    "api_for_model",
    "derived_generation_id",
    "logical_request_key",
    "project_source_bytes",
    "restored_audio",
    "restored_source_digest",
    "run_config",
    "run_simulator",
    "wav_duration_seconds",
]


# Where each public name lives: imported on first use, so the light modules
# (config, catalog, the command line) do not drag aiohttp.web in.
_HOMES = {
    "Simulator": "app",
    "project_source_bytes": "audio", "restored_audio": "audio",
    "restored_source_digest": "audio", "wav_duration_seconds": "audio",
    "CURRENT_MODELS": "catalog", "ApiGeneration": "catalog", "api_for_model": "catalog",
    "DEFAULT_API_KEY": "config", "KeySpec": "config", "SimConfig": "config",
    "run_config": "config",
    "run_simulator": "server",
    "derived_generation_id": "state",
    "SimStats": "stats", "logical_request_key": "stats",
    "GenerationObserver": "timeline", "GenerationTimeline": "timeline",
    "StatusChange": "timeline",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'batcher.simulator' has no attribute {name!r}")
    return getattr(import_module(f"batcher.simulator.{home}"), name)

"""batcher: run bulk jobs against the Diffio audio-restoration API.

Resumable, rate-limited, and never paying twice for one logical request.
The names below are the public Python API; everything else is internal.
The running part of it (``make_settings``, ``run_manifest*``, ``RunResult``)
is imported on first use: ``batcher --version`` and ``batcher status`` must
not pay for aiohttp and the runner.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    ApiError,
    BatcherError,
    ConfigError,
    LedgerError,
    LedgerLocked,
    ManifestError,
)
from .settings import Settings
from .version import __version__

if TYPE_CHECKING:
    from .api import make_settings, run_manifest, run_manifest_async
    from .run import RunResult

__all__ = [
    "ApiError",
    "BatcherError",
    "ConfigError",
    "LedgerError",
    "LedgerLocked",
    "ManifestError",
    "RunResult",
    "Settings",
    "__version__",
    "make_settings",
    "run_manifest",
    "run_manifest_async",
]


def __getattr__(name: str) -> Any:
    """The lazy part of the public API (PEP 562)."""
    if name in ("make_settings", "run_manifest", "run_manifest_async"):
        from . import api

        return getattr(api, name)
    if name == "RunResult":
        from .run import RunResult

        return RunResult
    raise AttributeError(f"module 'batcher' has no attribute {name!r}")

"""batcher: run bulk jobs against the Diffio audio-restoration API.

Resumable, rate-limited, and never paying twice for one logical request.
The names below are the public Python API; everything else is internal.
"""

from .api import make_settings, run_manifest, run_manifest_async
from .errors import (
    ApiError,
    BatcherError,
    ConfigError,
    LedgerError,
    LedgerLocked,
    ManifestError,
)
from .run import RunResult
from .settings import Settings
from .version import __version__

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

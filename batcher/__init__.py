"""batcher: run bulk jobs against the Diffio audio-restoration API.

Resumable, rate-limited, and never paying twice for one logical request.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

"""batcher's version, and the name it gives itself on the wire."""

from __future__ import annotations

__all__ = ["USER_AGENT", "__version__"]

__version__ = "0.1.0"

#: Sent as ``User-Agent`` on every request: the API, the upload host, downloads.
USER_AGENT = f"batcher/{__version__}"

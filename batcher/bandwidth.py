"""A byte-rate cap for transfers: ``--max-bandwidth``, like rclone's ``--bwlimit``.

Uploads and downloads of one run share one :class:`Bandwidth`. Before a
chunk goes out (or after it came in) its size is taken from the budget, so
the run's transfers together stay under the cap and a nightly job does not
fill an office link.

The budget is an :class:`aiolimiter.AsyncLimiter` used as a byte bucket:
capacity ``burst`` bytes, refilled at ``bytes_per_second``. aiolimiter is the
right tool here and not for the API's request rate (see ``ratelimit.py``):
bytes are an amount to meter smoothly, a fresh bucket may burst a fraction of
a second's worth, and the cap never changes while a run goes on. A chunk
larger than the bucket is taken in bucket-sized pieces, because
``AsyncLimiter.acquire`` refuses amounts above its capacity.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiolimiter import AsyncLimiter

__all__ = ["Bandwidth", "format_rate", "parse_rate"]

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:/s)?\s*$", re.IGNORECASE)
# The bucket holds this many seconds of the cap: small enough that a burst
# at start is harmless, large enough that a 1 MiB chunk at a modest cap is
# a few acquires, not thousands.
_BURST_SECONDS = 0.25
_MIN_BURST = 16 * 1024


def parse_rate(text: str) -> float:
    """Bytes per second from ``text``: ``500000``, ``512K``, ``10M``, ``1.5G``.

    Suffixes are binary (``K`` = 1024 bytes, as rclone reads them), case does
    not matter, and ``B``, ``iB`` and ``/s`` may follow (``10MiB/s``).
    Raises ValueError with a message fit for the user otherwise.
    """
    match = _RATE.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a byte rate: write bytes per second with an optional "
            "K, M or G suffix, e.g. 512K or 10M"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"{text!r}: a bandwidth cap must be above 0")
    return value


def format_rate(bytes_per_second: float) -> str:
    """``10.0 MiB/s``: a byte rate for people."""
    value = bytes_per_second
    for unit in ("B/s", "KiB/s", "MiB/s"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB/s"


class Bandwidth:
    """A shared byte budget; ``None`` as the rate means no cap (takes are free).

    ``take(n)`` waits until ``n`` bytes fit under the cap. Callers take a
    chunk's size right before sending it, or right after receiving it, so the
    average over any second or so stays under ``bytes_per_second``.
    """

    __slots__ = ("_bucket", "bytes_per_second", "taken")

    def __init__(self, bytes_per_second: float | None) -> None:
        self.bytes_per_second = bytes_per_second
        self.taken = 0
        self._bucket: AsyncLimiter | None = None
        if bytes_per_second is not None:
            if bytes_per_second <= 0:
                raise ValueError("bytes_per_second must be above 0")
            burst = max(_MIN_BURST, bytes_per_second * _BURST_SECONDS)
            # Imported here: only a capped run needs it (and it imports asyncio
            # and importlib.metadata, which `batcher --version` would pay for).
            from aiolimiter import AsyncLimiter

            self._bucket = AsyncLimiter(burst, burst / bytes_per_second)

    @property
    def capped(self) -> bool:
        """Whether a cap is set."""
        return self._bucket is not None

    async def take(self, amount: int) -> None:
        """Wait until ``amount`` bytes fit under the cap, then count them."""
        self.taken += amount
        bucket = self._bucket
        if bucket is None or amount <= 0:
            return
        left = float(amount)
        while left > 0:
            piece = min(left, bucket.max_rate)
            await bucket.acquire(piece)
            left -= piece

    def seconds_for(self, amount: int) -> float:
        """How long ``amount`` bytes take at the cap (0 without one)."""
        if self.bytes_per_second is None:
            return 0.0
        return amount / self.bytes_per_second

    def __repr__(self) -> str:
        cap = "none" if self.bytes_per_second is None else format_rate(self.bytes_per_second)
        return f"Bandwidth(cap={cap}, taken={self.taken})"

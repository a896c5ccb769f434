"""The receiver's counters, and the snapshot progress, status and metrics read.

Every ``POST`` delivery is counted once in ``received`` and once in exactly
one outcome, so ``received == recorded + duplicates + stale + unknown +
sinkErrors + sum(refused.values())`` at every snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batcher.errors import RefusalReason
from batcher.webhooks.sink import Disposition

__all__ = ["COUNTER_NAMES", "ReceiverStats"]

#: The snapshot's top-level names; ``refused`` holds one count per RefusalReason value.
COUNTER_NAMES = ("received", "recorded", "duplicates", "stale", "unknown", "sinkErrors", "refused")

_BY_DISPOSITION = {
    Disposition.RECORDED: "recorded",
    Disposition.DUPLICATE: "duplicates",
    Disposition.STALE: "stale",
    Disposition.UNKNOWN: "unknown",
}


@dataclass(slots=True)
class ReceiverStats:
    """Live counters of one receiver; :meth:`snapshot` copies them out."""

    received: int = 0
    recorded: int = 0
    duplicates: int = 0
    stale: int = 0
    unknown: int = 0
    # The sink raised or timed out: answered 503, the sender will deliver again.
    sink_errors: int = 0
    refused: dict[RefusalReason, int] = field(
        default_factory=lambda: dict.fromkeys(RefusalReason, 0))

    def count(self, disposition: Disposition) -> None:
        """One delivery ended with ``disposition`` (answered 2xx)."""
        name = _BY_DISPOSITION[disposition]
        setattr(self, name, getattr(self, name) + 1)

    def refuse(self, reason: RefusalReason) -> None:
        """One delivery was refused for ``reason``."""
        self.refused[reason] += 1

    @property
    def refused_total(self) -> int:
        """Deliveries refused, all reasons together."""
        return sum(self.refused.values())

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON-ready counters, camelCase (see ``COUNTER_NAMES``)."""
        return {
            "received": self.received,
            "recorded": self.recorded,
            "duplicates": self.duplicates,
            "stale": self.stale,
            "unknown": self.unknown,
            "sinkErrors": self.sink_errors,
            "refused": {reason.value: n for reason, n in self.refused.items()},
        }

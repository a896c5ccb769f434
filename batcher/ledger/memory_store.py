"""What a memory ledger holds: the rows, events, runs, leases and parts a database would.

Every handle of a shared memory ledger holds the same store (see
:meth:`~batcher.ledger.memory.MemoryLedger.connect`), as every host holds a
connection to the same database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batcher.ledger.memory_webhooks import EventStore
from batcher.ledger.rules import PaceState
from batcher.model import Event as LedgerEvent
from batcher.model import LedgerRow, UploadPart

__all__ = ["MemoryStore"]


@dataclass(eq=False)
class MemoryStore:
    """What a database would hold; every handle of a shared ledger holds the same one."""

    clock: Callable[[], float]  # the store's own time: leases and heartbeats
    rows: dict[str, LedgerRow] = field(default_factory=dict)
    # row_id -> the highest import epoch that saw it (every run that opens
    # for writing takes the next epoch, as on PostgreSQL)
    seen: dict[str, int] = field(default_factory=dict)
    groups: dict[str, set[str]] = field(default_factory=dict)
    events: dict[str, list[LedgerEvent]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # row -> (owner, expires)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    epoch: int = 0
    pace: PaceState = field(default_factory=PaceState)
    # (row_id, upload_id) -> part number -> the part
    parts: dict[tuple[str, str], dict[int, UploadPart]] = field(default_factory=dict)
    webhooks: EventStore = field(default_factory=EventStore)

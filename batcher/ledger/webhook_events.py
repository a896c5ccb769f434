"""The API's generation events in the ledger: what is kept, and what an event changes.

A verified delivery is a fact about a generation. The ledger keeps it in
``ledger_webhook_events`` (one row per message id) before the receiver
answers 2xx, so an acknowledged event survives any crash, and every host
sharing the ledger sees it. Whether an event is news is decided here, the
same way by every backend, inside the transaction that records it:

- a message id already kept is a **duplicate** (kept once, on every host);
- a generation no row of the ledger points at is **unknown**: not kept
  (the same API key's other jobs);
- an event that does not supersede the newest one kept for its generation,
  or is not ahead of the status a poll already wrote to the row, is
  **stale**: kept as history with that disposition, and changes nothing;
- anything else is **recorded**: runs read it (:meth:`events_since`) and move
  the row on exactly as a poll answer would.

Counters (deliveries received, refused by reason, polls saved) live in
``ledger_webhook_counts`` so ``batcher status`` can show them; they are
added to in batches and are informative, not part of any guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from batcher.webhooks.events import GenerationEvent, advances, supersedes
from batcher.webhooks.sink import Disposition

__all__ = ["StoredEvent", "WebhookLedger", "decide"]

#: The dispositions that are kept as rows (the others are not stored).
KEPT = (Disposition.RECORDED, Disposition.STALE)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as the ledger keeps it; ``seq`` orders them, ledger-wide."""

    seq: int
    message_id: str
    event: GenerationEvent
    received_at: float
    disposition: Disposition


def decide(
    event: GenerationEvent,
    *,
    duplicate: bool,
    known: bool,
    row_status: str | None,
    latest: GenerationEvent | None,
) -> Disposition:
    """What recording ``event`` does, given what the ledger holds (see the module)."""
    if duplicate:
        return Disposition.DUPLICATE
    if not known:
        return Disposition.UNKNOWN
    if not supersedes(event, latest) or not advances(event, row_status):
        return Disposition.STALE
    return Disposition.RECORDED


class WebhookLedger(Protocol):
    """The event methods every ledger backend has."""

    async def record_webhook_event(self, event: GenerationEvent, message_id: str
                                   ) -> Disposition:
        """Keep ``event`` (see the module) durably before returning its disposition."""
        ...

    async def webhook_events_since(self, seq: int, limit: int = 1000) -> list[StoredEvent]:
        """Events kept after ``seq`` (0: from the start), oldest first, at most ``limit``."""
        ...

    async def add_webhook_counts(self, deltas: Mapping[str, int]) -> None:
        """Add to the named counters (created at 0); zero deltas are skipped."""
        ...

    async def webhook_counts(self) -> dict[str, int]:
        """Every counter by name (empty when webhooks were never used)."""
        ...

"""The memory ledger's webhook-event methods (see :mod:`batcher.ledger.webhook_events`)."""

from __future__ import annotations

from collections.abc import Mapping

import anyio.lowlevel

from batcher.ledger.memory_store import MemoryHandle
from batcher.ledger.webhook_events import KEPT, StoredEvent, decide
from batcher.webhooks.events import GenerationEvent
from batcher.webhooks.sink import Disposition

__all__ = ["MemoryWebhookEvents"]


class MemoryWebhookEvents(MemoryHandle):
    """Mixed into :class:`~batcher.ledger.memory.MemoryLedger`."""

    async def record_webhook_event(self, event: GenerationEvent, message_id: str
                                   ) -> Disposition:
        """Keep ``event`` unless duplicate or unknown; returns its disposition."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        store = self._db.webhooks
        gen = event.generation_id
        row = None
        if message_id not in store.message_ids:
            row = min((r for r in self._db.rows.values() if r.generation_id == gen),
                      key=lambda r: r.row_id, default=None)
        disposition = decide(event, duplicate=message_id in store.message_ids,
                             known=row is not None,
                             row_status=None if row is None else row.api_status,
                             latest=store.latest.get(gen))
        if disposition in KEPT:
            store.message_ids.add(message_id)
            store.kept.append(StoredEvent(len(store.kept) + 1, message_id, event,
                                          self._wall(), disposition))
            if disposition is Disposition.RECORDED:
                store.latest[gen] = event
        return disposition

    async def webhook_events_since(self, seq: int, limit: int = 1000) -> list[StoredEvent]:
        """Events kept after ``seq``, oldest first."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        return self._db.webhooks.kept[max(seq, 0):max(seq, 0) + limit]

    async def add_webhook_counts(self, deltas: Mapping[str, int]) -> None:
        """Add to the named counters."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        counts = self._db.webhooks.counts
        for name, delta in deltas.items():
            if delta:
                counts[name] = counts.get(name, 0) + delta

    async def webhook_counts(self) -> dict[str, int]:
        """Every counter by name."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        return dict(sorted(self._db.webhooks.counts.items()))

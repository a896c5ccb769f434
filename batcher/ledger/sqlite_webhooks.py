"""The SQLite ledger's webhook-event methods (see :mod:`batcher.ledger.webhook_events`).

Recording runs as one job of the group-commit writer, so the decision and
the insert share a transaction and the caller's await returns only after the
commit: the receiver acknowledges a delivery only once it is on disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import TypeVar

from batcher.ledger.webhook_events import KEPT, StoredEvent, decide
from batcher.ledger.webhook_sql import QUERIES
from batcher.webhooks.events import GenerationEvent
from batcher.webhooks.sink import Disposition

__all__ = ["SqliteWebhookEvents"]

T = TypeVar("T")


class SqliteWebhookEvents:
    """Mixed into :class:`~batcher.ledger.sqlite.SqliteLedger`."""

    _wall: Callable[[], float]

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def record_webhook_event(self, event: GenerationEvent, message_id: str
                                   ) -> Disposition:
        """Keep ``event`` durably unless duplicate or unknown; returns its disposition."""
        received_at = self._wall()
        generation = {"generation_id": event.generation_id}

        def job(conn: sqlite3.Connection) -> Disposition:
            duplicate = conn.execute(QUERIES["event_duplicate"],
                                     {"message_id": message_id}).fetchone() is not None
            row = None if duplicate else conn.execute(
                QUERIES["event_row_status"], generation).fetchone()
            latest = None
            if row is not None:
                found = conn.execute(QUERIES["event_latest"], generation).fetchone()
                latest = None if found is None else GenerationEvent.from_json(found[0])
            disposition = decide(event, duplicate=duplicate, known=row is not None,
                                 row_status=None if row is None else row[0], latest=latest)
            if disposition in KEPT:
                conn.execute(QUERIES["event_insert"], {
                    "message_id": message_id, "generation_id": event.generation_id,
                    "status": event.status.value, "disposition": disposition.value,
                    "received_at": received_at, "payload": event.to_json().decode()})
            return disposition

        return await self._write(job)

    async def webhook_events_since(self, seq: int, limit: int = 1000) -> list[StoredEvent]:
        """Events kept after ``seq``, oldest first."""

        def job(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [StoredEvent(n, mid, GenerationEvent.from_json(payload), at,
                                Disposition(disp))
                    for n, mid, disp, at, payload in conn.execute(
                        QUERIES["events_since"], {"seq": seq, "limit": limit})]

        return await self._read(job)

    async def add_webhook_counts(self, deltas: Mapping[str, int]) -> None:
        """Add to the named counters."""
        items = [{"name": k, "delta": v} for k, v in sorted(deltas.items()) if v]
        if not items:
            return

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(QUERIES["count_add"], items)

        await self._write(job)

    async def webhook_counts(self) -> dict[str, int]:
        """Every counter by name."""

        def job(conn: sqlite3.Connection) -> dict[str, int]:
            try:
                return {name: int(n) for name, n in conn.execute(QUERIES["counts"])}
            except sqlite3.OperationalError:  # a ledger from before webhooks, read-only
                return {}

        return await self._read(job)

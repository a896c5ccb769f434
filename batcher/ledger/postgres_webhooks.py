"""The PostgreSQL ledger's webhook-event methods (see :mod:`batcher.ledger.webhook_events`).

Several receivers (``batcher webhooks serve`` on several hosts, or runs with
``--webhook-listen``) may record events of one generation at once: each
recording takes a transaction-scoped advisory lock on the generation, so
the staleness decision and the insert are one step per generation, and the
unique message id makes a duplicate that races through a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import asyncpg

from batcher.ledger.postgres_sql import PostgresPlumbing, positional
from batcher.ledger.webhook_events import KEPT, StoredEvent, decide
from batcher.ledger.webhook_sql import QUERIES
from batcher.webhooks.events import GenerationEvent
from batcher.webhooks.sink import Disposition

__all__ = ["PostgresWebhookEvents"]

_Q = {name: positional(sql) for name, sql in QUERIES.items()}
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('batcher.webhook:' || $1))"


class PostgresWebhookEvents(PostgresPlumbing):
    """Mixed into :class:`~batcher.ledger.postgres.PostgresLedger`."""

    async def record_webhook_event(self, event: GenerationEvent, message_id: str
                                   ) -> Disposition:
        """Keep ``event`` durably unless duplicate or unknown; returns its disposition."""
        pool = self._pool_for(write=True)
        gen = event.generation_id
        with self._translate(f"record a webhook event of generation {gen}"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(_LOCK, gen)
                duplicate = await _fetchval(conn, "event_duplicate",
                                            {"message_id": message_id}) is not None
                row = None if duplicate else await conn.fetchrow(
                    _Q["event_row_status"].text, gen)
                latest = None
                if row is not None:
                    payload = await _fetchval(conn, "event_latest", {"generation_id": gen})
                    latest = None if payload is None else GenerationEvent.from_json(payload)
                disposition = decide(event, duplicate=duplicate, known=row is not None,
                                     row_status=None if row is None else row["api_status"],
                                     latest=latest)
                if disposition in KEPT:
                    q = _Q["event_insert"]
                    await conn.execute(q.text, *q.args({
                        "message_id": message_id, "generation_id": gen,
                        "status": event.status.value, "disposition": disposition.value,
                        "received_at": self._wall(), "payload": event.to_json().decode()}))
        return disposition

    async def webhook_events_since(self, seq: int, limit: int = 1000) -> list[StoredEvent]:
        """Events kept after ``seq``, oldest first."""
        pool = self._pool_for(write=False)
        q = _Q["events_since"]
        with self._translate("read webhook events"):
            found = await pool.fetch(q.text, *q.args({"seq": seq, "limit": limit}))
        return [StoredEvent(r["seq"], r["message_id"], GenerationEvent.from_json(r["payload"]),
                            r["received_at"], Disposition(r["disposition"])) for r in found]

    async def add_webhook_counts(self, deltas: Mapping[str, int]) -> None:
        """Add to the named counters."""
        items = [(k, v) for k, v in sorted(deltas.items()) if v]
        if not items:
            return
        pool = self._pool_for(write=True)
        with self._translate("count webhook deliveries"):
            await pool.executemany(_Q["count_add"].text, items)

    async def webhook_counts(self) -> dict[str, int]:
        """Every counter by name."""
        pool = self._pool_for(write=False)
        with self._translate("read webhook counters"), \
                contextlib.suppress(asyncpg.UndefinedTableError):
            return {r["name"]: int(r["count"]) for r in await pool.fetch(_Q["counts"].text)}
        return {}


async def _fetchval(conn: Any, name: str, params: Mapping[str, Any]
                    ) -> Any:
    q = _Q[name]
    return await conn.fetchval(q.text, *q.args(params))



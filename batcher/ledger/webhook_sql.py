"""The SQL of the ledger's webhook events, shared by SQLite and PostgreSQL.

Written with ``:named`` parameters; the PostgreSQL backend rewrites them
(:func:`batcher.ledger.postgres_sql.positional`). See
:mod:`batcher.ledger.webhook_events` for what the statements implement.
"""

from __future__ import annotations

__all__ = ["QUERIES"]

QUERIES: dict[str, str] = {
    "event_duplicate": (
        "SELECT 1 FROM ledger_webhook_events WHERE message_id = :message_id"),
    "event_row_status": (
        "SELECT api_status FROM ledger_rows WHERE generation_id = :generation_id "
        "ORDER BY row_id LIMIT 1"),
    "event_latest": (
        "SELECT payload FROM ledger_webhook_events WHERE generation_id = :generation_id "
        "AND disposition = 'recorded' ORDER BY seq DESC LIMIT 1"),
    "event_insert": (
        "INSERT INTO ledger_webhook_events "
        "(message_id, generation_id, status, disposition, received_at, payload) "
        "VALUES (:message_id, :generation_id, :status, :disposition, :received_at, :payload)"),
    "events_since": (
        "SELECT seq, message_id, disposition, received_at, payload FROM ledger_webhook_events "
        "WHERE seq > :seq ORDER BY seq LIMIT :limit"),
    "count_add": (
        "INSERT INTO ledger_webhook_counts (name, count) VALUES (:name, :delta) "
        "ON CONFLICT (name) DO UPDATE SET count = ledger_webhook_counts.count + :delta"),
    "counts": "SELECT name, count FROM ledger_webhook_counts ORDER BY name",
}

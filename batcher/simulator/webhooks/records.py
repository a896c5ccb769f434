"""What the simulator's webhook sender works with: subjects, endpoints, records, counters.

Kept apart from the sender's machinery so the simulator (which names the
generation an event is about) and the admin routes (which configure
endpoints) depend on plain data only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from enum import StrEnum

from batcher.webhooks.events import EventType, GenerationEvent
from batcher.webhooks.secret import WebhookSecret

__all__ = [
    "MODES",
    "DeliveryKind",
    "DeliveryRecord",
    "EventSubject",
    "SenderStats",
    "WebhookEndpoint",
    "api_key_id",
]

MODES = ("test", "live")


def api_key_id(api_key: str) -> str:
    """The public id of an API key, as events carry it (never the key itself)."""
    return "key_" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:20]


class DeliveryKind(StrEnum):
    """What a delivery is; genuine kinds are retried, fault copies are not."""

    EVENT = "event"  # the genuine delivery of an event
    DUPLICATE = "duplicate"  # a second genuine delivery, same message id
    TEST = "test"  # send_test_event
    FORGED = "forged"
    TAMPERED = "tampered"
    REPLAY = "replay"
    STALE = "stale"
    FUTURE = "future"


@dataclass(frozen=True, slots=True)
class EventSubject:
    """The generation an event is about, as the payload names it."""

    generation_id: str
    api_project_id: str
    api_key_id: str
    model_key: str | None = None
    has_video: bool = False


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where events go and the secret they are signed with."""

    url: str
    secret: WebhookSecret = field(repr=False)
    event_types: frozenset[EventType] = frozenset(EventType)
    api_key_id: str | None = None  # None: events of every key
    mode: str = "live"
    endpoint_id: str = ""
    updated_by_key_id: str | None = None
    updated_at: str = ""

    def wants(self, key_id: str, mode: str, event_type: EventType) -> bool:
        """Whether an event of ``key_id`` in ``mode`` goes to this endpoint."""
        return (self.api_key_id in (None, key_id) and self.mode == mode
                and event_type in self.event_types)


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One HTTP attempt, as kept in the sender's journal."""

    message_id: str
    kind: DeliveryKind
    event: GenerationEvent  # the genuine event the delivery is about
    url: str
    attempt: int
    status: int | None  # the HTTP answer; None: no answer (connect error, timeout)
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(repr=False)

    @property
    def ok(self) -> bool:
        """Answered 2xx."""
        return self.status is not None and 200 <= self.status < 300


@dataclass(slots=True)
class SenderStats:
    """The sender's counters; ``snapshot`` gives them camelCase."""

    scheduled: int = 0  # (event, endpoint) pairs planned
    delivered: int = 0  # genuine deliveries answered 2xx (a duplicate copy not counted)
    dropped: int = 0
    dropped_terminal: int = 0  # of them, complete/failed events: the receiver must poll
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0  # actually held back behind a later event
    forged: int = 0
    tampered: int = 0
    replayed: int = 0
    stale_sent: int = 0
    future_sent: int = 0
    test_sent: int = 0
    attempts: int = 0  # HTTP POSTs
    retries: int = 0
    failed: int = 0  # genuine deliveries given up after max_attempts
    abandoned: int = 0  # deliveries still pending when the sender closed
    # POSTs the receiver answered (any status), by delivery kind: what it
    # can have counted (a copy sent after it stopped listening is not here).
    answered: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, int]:
        """The counters as plain data."""
        out = {}
        for f in fields(self):
            head, *rest = f.name.split("_")
            out[head + "".join(part.title() for part in rest)] = getattr(self, f.name)
        return out

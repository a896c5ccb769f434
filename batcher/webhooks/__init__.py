"""Receiving the API's signed generation events (webhooks).

The API posts an event each time a generation's status changes, signed the
Svix / Standard Webhooks way. A receiver turns each delivery into a
verified :class:`GenerationEvent` for a sink (the ledger), so a run can wait
for events instead of spending its rate budget on polls::

    secret = load_secret()                       # BATCHER_WEBHOOK_SECRET
    receiver = WebhookReceiver(secret, sink)     # sink: an EventSink
    async with serve_receiver("127.0.0.1", 0, receiver) as address:
        ...                                      # deliveries to address.url
    receiver.snapshot()                          # counters

Modules: ``secret`` (the masked secret and where it comes from),
``signing`` (sign and verify), ``events`` (the event and which is newer),
``sink`` (the sink protocol, a memory sink), ``dedupe`` (recent message ids),
``stats`` (counters), ``receiver`` (the pipeline and its aiohttp app),
``server`` (binding, ``HOST:PORT``). Its errors are in :mod:`batcher.errors`.
"""

from __future__ import annotations

from batcher.errors import (
    DeliveryRefused,
    EventError,
    ListenAddressError,
    RefusalReason,
    VerificationError,
    WebhookSecretError,
)
from batcher.webhooks.events import (
    EventStatus,
    EventType,
    GenerationEvent,
    advances,
    status_rank,
    supersedes,
)
from batcher.webhooks.receiver import DEFAULT_MAX_BODY, Outcome, WebhookReceiver
from batcher.webhooks.secret import DEFAULT_SECRET_ENV, WebhookSecret, load_secret
from batcher.webhooks.server import ListenAddress, parse_listen, serve_receiver
from batcher.webhooks.signing import DEFAULT_TOLERANCE, SignedDelivery, Verifier, signed_headers
from batcher.webhooks.sink import Disposition, EventSink, MemorySink
from batcher.webhooks.stats import COUNTER_NAMES, ReceiverStats

__all__ = [
    "COUNTER_NAMES",
    "DEFAULT_MAX_BODY",
    "DEFAULT_SECRET_ENV",
    "DEFAULT_TOLERANCE",
    "DeliveryRefused",
    "Disposition",
    "EventError",
    "EventSink",
    "EventStatus",
    "EventType",
    "GenerationEvent",
    "ListenAddress",
    "ListenAddressError",
    "MemorySink",
    "Outcome",
    "ReceiverStats",
    "RefusalReason",
    "SignedDelivery",
    "VerificationError",
    "Verifier",
    "WebhookReceiver",
    "WebhookSecret",
    "WebhookSecretError",
    "advances",
    "load_secret",
    "parse_listen",
    "serve_receiver",
    "signed_headers",
    "status_rank",
    "supersedes",
]

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

from importlib import import_module
from typing import TYPE_CHECKING, Any

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
from batcher.webhooks.secret import DEFAULT_SECRET_ENV, WebhookSecret, load_secret
from batcher.webhooks.sink import Disposition, EventSink, MemorySink
from batcher.webhooks.stats import COUNTER_NAMES, ReceiverStats

if TYPE_CHECKING:
    from batcher.webhooks.receiver import DEFAULT_MAX_BODY, Outcome, WebhookReceiver
    from batcher.webhooks.server import ListenAddress, parse_listen, serve_receiver
    from batcher.webhooks.signing import (
        DEFAULT_TOLERANCE,
        SignedDelivery,
        Verifier,
        signed_headers,
    )

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


# The receiver, its server and the signatures need aiohttp.web and
# standardwebhooks: imported on first use, so that a run without webhooks
# (the ledger imports the event types) does not pay for them.
_LAZY = {
    "DEFAULT_MAX_BODY": "receiver", "Outcome": "receiver", "WebhookReceiver": "receiver",
    "ListenAddress": "server", "parse_listen": "server", "serve_receiver": "server",
    "DEFAULT_TOLERANCE": "signing", "SignedDelivery": "signing", "Verifier": "signing",
    "signed_headers": "signing",
}


def __getattr__(name: str) -> Any:
    """Import a public name of the receiving side on first use (PEP 562)."""
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'batcher.webhooks' has no attribute {name!r}")
    return getattr(import_module(f"batcher.webhooks.{home}"), name)

"""The errors of the webhook receiver, and why a delivery was refused.

They join batcher's one error tree::

    BatcherError
    ├── ConfigError
    │   ├── WebhookSecretError   the signing secret is missing or not ``whsec_…``
    │   └── ListenAddressError   a ``--webhook-listen`` value that is not HOST:PORT
    └── DeliveryRefused          one delivery refused; ``reason`` and ``http_status``
        ├── VerificationError    headers, timestamp or signature do not hold
        └── EventError           signed, but not a generation event we understand

A refusal is about one delivery and never stops the receiver. Messages never
contain the signing secret: nothing here is ever given it.
"""

from __future__ import annotations

from enum import StrEnum

from batcher.errors import BatcherError, ConfigError

__all__ = [
    "DeliveryRefused",
    "EventError",
    "ListenAddressError",
    "RefusalReason",
    "VerificationError",
    "WebhookSecretError",
]


class RefusalReason(StrEnum):
    """Why a delivery was refused; the values are the counters' names."""

    # A signing header (id, timestamp, signature) is absent or unreadable.
    MISSING_HEADERS = "missingHeaders"
    # No ``v1`` signature matches: a third party, a tampered body, a wrong secret.
    BAD_SIGNATURE = "badSignature"
    # Signed longer ago than the tolerance: a replay, or a sender's clock far behind.
    STALE_TIMESTAMP = "staleTimestamp"
    # Signed further ahead than the tolerance: a sender's clock far ahead.
    FUTURE_TIMESTAMP = "futureTimestamp"
    # Verified, but not JSON, or not a generation event (missing field, unknown type).
    BAD_BODY = "badBody"
    # Longer than the receiver's body cap.
    TOO_LARGE = "tooLarge"


# What the sender is told. 4xx makes Svix retry later, which is right for a
# clock problem and harmless for a forgery; 413 and 400 say "do not resend as is".
HTTP_STATUS: dict[RefusalReason, int] = {
    RefusalReason.MISSING_HEADERS: 400,
    RefusalReason.BAD_SIGNATURE: 401,
    RefusalReason.STALE_TIMESTAMP: 401,
    RefusalReason.FUTURE_TIMESTAMP: 401,
    RefusalReason.BAD_BODY: 400,
    RefusalReason.TOO_LARGE: 413,
}


class WebhookSecretError(ConfigError):
    """The signing secret is missing or malformed.

    The message names the environment variable, never the value.
    """


class ListenAddressError(ConfigError):
    """A listen address that is not ``HOST:PORT`` (or ``PORT``)."""


class DeliveryRefused(BatcherError):
    """One webhook delivery was refused; the receiver answers ``http_status``."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")

    @property
    def http_status(self) -> int:
        """The HTTP status the receiver answers with."""
        return HTTP_STATUS[self.reason]


class VerificationError(DeliveryRefused):
    """The delivery's signing headers, timestamp or signature do not hold."""


class EventError(DeliveryRefused):
    """The body is authentic but not a generation event this receiver understands."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(RefusalReason.BAD_BODY, message)

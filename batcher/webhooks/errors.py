"""The webhook receiver's errors now live in :mod:`batcher.errors`, with every other.

Kept so that ``from batcher.webhooks.errors import ...`` goes on working;
new code imports from :mod:`batcher.errors`.
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

__all__ = [
    "DeliveryRefused",
    "EventError",
    "ListenAddressError",
    "RefusalReason",
    "VerificationError",
    "WebhookSecretError",
]

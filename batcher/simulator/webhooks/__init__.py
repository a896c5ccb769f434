"""The simulator's side of webhooks: signed generation events sent to a URL.

- :class:`WebhookSender` (``sender.py``): told about each generation status
  change with its clock time (:meth:`WebhookSender.schedule`), it signs the
  event as Svix does and delivers it when that time comes, with retries.
- the plain data it works with (``records.py``): :class:`EventSubject`,
  :class:`WebhookEndpoint`, :class:`DeliveryRecord`, :class:`SenderStats`.
- :class:`WebhookFaults` (``faults.py``): drop, duplicate, delay, reorder,
  forged, tampered, replayed and stale/future deliveries, drawn from a seed.
- :func:`add_webhook_routes` (``admin.py``): ``POST /v1/webhooks/configure``
  and ``/v1/webhooks/send_test_event`` on the simulator's application.

Wiring, for a simulator with a sender::

    async with WebhookSender(faults=..., seed=..., default_secret=secret) as sender:
        sender.configure(url)                                  # --webhook-url
        add_webhook_routes(sim.app, sender, sim.state, {"admin-key": {"webhooks:write"}})
        sender.schedule(EventSubject(gen_id, project_id, api_key_id(owner)), "queued", at)
"""

from __future__ import annotations

from batcher.simulator.webhooks.admin import (
    WEBHOOKS_WRITE,
    KeyStore,
    WebhookAdminRoutes,
    add_webhook_routes,
    describe_endpoint,
)
from batcher.simulator.webhooks.faults import WebhookFaults
from batcher.simulator.webhooks.records import (
    DeliveryKind,
    DeliveryRecord,
    EventSubject,
    SenderStats,
    WebhookEndpoint,
    api_key_id,
)
from batcher.simulator.webhooks.sender import WebhookSender

__all__ = [
    "WEBHOOKS_WRITE",
    "DeliveryKind",
    "DeliveryRecord",
    "EventSubject",
    "KeyStore",
    "SenderStats",
    "WebhookAdminRoutes",
    "WebhookEndpoint",
    "WebhookFaults",
    "WebhookSender",
    "add_webhook_routes",
    "api_key_id",
    "describe_endpoint",
]

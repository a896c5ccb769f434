"""The simulator's side of webhooks: signed generation events sent to a URL.

- :class:`WebhookSender` (``sender.py``): told about each generation status
  change with its clock time (:meth:`WebhookSender.schedule`), it signs the
  event as Svix does and delivers it when that time comes, with retries.
- the plain data it works with (``records.py``): :class:`EventSubject`,
  :class:`WebhookEndpoint`, :class:`DeliveryRecord`, :class:`SenderStats`.
- :class:`WebhookFaults` (``faults.py``): drop, duplicate, delay, reorder,
  forged, tampered, replayed and stale/future deliveries, drawn from a seed.
- :func:`attach_webhooks` (``wiring.py``): a simulator's generations tell the
  sender their status changes; the admin routes and ``GET /_sim/webhooks``.
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
from batcher.simulator.webhooks.wiring import SenderObserver, attach_webhooks

__all__ = [
    "WEBHOOKS_WRITE",
    "DeliveryKind",
    "DeliveryRecord",
    "EventSubject",
    "KeyStore",
    "SenderObserver",
    "SenderStats",
    "WebhookAdminRoutes",
    "WebhookEndpoint",
    "WebhookFaults",
    "WebhookSender",
    "add_webhook_routes",
    "api_key_id",
    "attach_webhooks",
    "describe_endpoint",
]

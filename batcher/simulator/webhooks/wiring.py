"""Wiring a :class:`WebhookSender` into a :class:`~batcher.simulator.app.Simulator`.

:func:`attach_webhooks` makes the simulator tell the sender every status
change of each generation it creates (queued at once, processing, then
complete or failed, at the times its progress answers will show them),
mounts ``POST /v1/webhooks/configure`` and ``/v1/webhooks/send_test_event``,
and ``GET /_sim/webhooks`` (the sender's counters and faults, no auth).
Call it before the simulator is served: aiohttp freezes routes then.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from aiohttp import web

from batcher.simulator.app import Simulator
from batcher.simulator.timeline import GenerationTimeline
from batcher.simulator.webhooks.admin import add_webhook_routes
from batcher.simulator.webhooks.records import EventSubject, api_key_id
from batcher.simulator.webhooks.sender import WebhookSender

__all__ = ["SenderObserver", "attach_webhooks"]


class SenderObserver:
    """A generation observer that schedules each planned status change as an event."""

    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender

    def generation_created(self, timeline: GenerationTimeline) -> None:
        """Schedule queued, processing and the ending of a new generation."""
        # Routed by the key's public id as the admin routes compute it.
        subject = EventSubject(timeline.generation_id, timeline.api_project_id,
                               api_key_id(timeline.api_key), timeline.model_key,
                               timeline.has_video)
        for change in timeline.changes:
            self.sender.schedule(subject, change.status, change.at, error=change.error,
                                 error_details=change.error_details)


def attach_webhooks(
    sim: Simulator,
    sender: WebhookSender,
    admin_keys: Mapping[str, Collection[str]] | None = None,
) -> None:
    """Make ``sim`` send its generations' events through ``sender`` (see the module)."""
    sim.add_observer(SenderObserver(sender))
    add_webhook_routes(sim.app, sender, sim.state, admin_keys or {}, wall=sim.state.wall)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"sender": sender.stats.snapshot(),
                                  "faults": sender.faults.to_dict(),
                                  "endpoints": len(sender.endpoints())})

    sim.app.router.add_get("/_sim/webhooks", stats)

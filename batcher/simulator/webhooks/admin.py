"""``POST /v1/webhooks/configure`` and ``/v1/webhooks/send_test_event``.

Both are admin endpoints: the key must be known and active (as for every
endpoint: 401, 403) and hold admin permission with the ``webhooks:write``
scope (403 otherwise). The simulator's keys carry no admin grants of their
own, so grants are given here, per key (``admin_keys``).

``configure`` takes ``{"mode": "test"|"live", "url", "eventTypes": [...],
"apiKeyId"?}`` and answers ``{"webhook": {...}}``. The real API delivers
only to HTTPS; the simulator also accepts ``http://`` to a loopback address
(127.0.0.0/8, ::1, localhost) so a local receiver can be tested without TLS.
Its answer carries the endpoint's ``signingSecret``, which the real API
shows elsewhere: a simulator's secret protects nothing.

``send_test_event`` takes ``{"eventType", "mode", "apiKeyId"?,
"samplePayload"?}``, delivers one event built from the sample at once (no
faults) and answers ``{"svixMessageId", "eventId", "eventType", "mode",
"apiKeyId"}``; 404 ``webhookNotConfigured`` when no endpoint wants it.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from batcher.errors import EventError
from batcher.simulator.model import Refusal
from batcher.simulator.routes import presented_key
from batcher.simulator.webhooks.records import MODES, WebhookEndpoint, api_key_id
from batcher.simulator.webhooks.sender import WebhookSender
from batcher.webhooks.events import STATUS_OF, EventType, GenerationEvent, format_time

__all__ = ["WEBHOOKS_WRITE", "KeyStore", "WebhookAdminRoutes", "add_webhook_routes",
           "describe_endpoint"]

#: The scope both endpoints need, with admin permission.
WEBHOOKS_WRITE = "webhooks:write"

Body = dict[str, Any]


class KeyView(Protocol):
    """What the admin routes read of a key's settings."""

    @property
    def active(self) -> bool: ...


class KeyStore(Protocol):
    """The simulator's keys, as the ``/v1`` endpoints look them up."""

    def key_spec(self, api_key: str) -> KeyView | None: ...


def describe_endpoint(endpoint: WebhookEndpoint) -> Body:
    """The ``webhook`` object of a configure answer."""
    return {
        "apiKeyId": endpoint.api_key_id,
        "mode": endpoint.mode,
        "endpointId": endpoint.endpoint_id,
        "eventTypes": [kind.value for kind in EventType if kind in endpoint.event_types],
        "url": endpoint.url,
        "signing": "svix",
        "updatedByKeyId": endpoint.updated_by_key_id,
        "updatedAt": endpoint.updated_at,
        "signingSecret": endpoint.secret.reveal(),
    }


class WebhookAdminRoutes:
    """The two handlers, bound to a sender, the key store and the admin grants."""

    def __init__(
        self,
        sender: WebhookSender,
        keys: KeyStore,
        admin_keys: Mapping[str, Collection[str]],
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sender = sender
        self.keys = keys
        self.admin_keys = admin_keys
        self.wall = wall

    def routes(self) -> list[web.RouteDef]:
        """Route definitions for ``app.router.add_routes``."""
        return [web.route("*", "/v1/webhooks/configure", self.configure),
                web.route("*", "/v1/webhooks/send_test_event", self.send_test_event)]

    async def configure(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/webhooks/configure``."""
        return await self._answer(request, self._configure)

    async def send_test_event(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/webhooks/send_test_event``."""
        return await self._answer(request, self._send_test_event)

    async def _answer(self, request: web.Request,
                      handler: Callable[[str, Body], Body]) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=204, headers={"Allow": "POST, OPTIONS"})
        try:
            if request.method != "POST":
                raise Refusal(405, "Method not allowed.", "methodNotAllowed",
                              headers={"Allow": "POST, OPTIONS"})
            key = self._authorize(presented_key(request.headers))
            result = handler(key, await _read_json(request))
        except Refusal as refusal:
            return web.json_response(refusal.body, status=refusal.status,
                                     headers=refusal.headers)
        return web.json_response(result)

    def _authorize(self, key: str | None) -> str:
        spec = self.keys.key_spec(key) if key is not None else None
        if key is None or spec is None:
            raise Refusal(401, "Invalid API key.", "invalidApiKey")
        if not spec.active:
            raise Refusal(403, "API key is not active.", "apiKeyInactive")
        if WEBHOOKS_WRITE not in self.admin_keys.get(key, ()):
            raise Refusal(403, f"API key lacks admin permission with scope {WEBHOOKS_WRITE}.",
                          "permissionDenied")
        return key

    def _configure(self, key: str, body: Body) -> Body:
        mode = _mode(body)
        url = body.get("url")
        if not isinstance(url, str) or not _allowed_url(url):
            raise Refusal(400, "url must be an HTTPS URL (the simulator also takes http:// to a "
                          "loopback address).", "invalidUrl")
        kinds = body.get("eventTypes")
        if (not isinstance(kinds, list) or not kinds
                or not all(isinstance(k, str) and k in EventType.__members__.values()
                           for k in kinds)):
            raise Refusal(400, "eventTypes must be a non-empty array of "
                          f"{', '.join(EventType)}.", "invalidEventTypes")
        caller = api_key_id(key)
        endpoint = self.sender.configure(
            url, api_key_id=_key_id(body) or caller, mode=mode,
            event_types={EventType(k) for k in kinds}, updated_by_key_id=caller)
        return {"webhook": describe_endpoint(endpoint)}

    def _send_test_event(self, key: str, body: Body) -> Body:
        raw_type = body.get("eventType")
        if not isinstance(raw_type, str) or raw_type not in EventType.__members__.values():
            raise Refusal(400, f"eventType must be one of {', '.join(EventType)}.",
                          "invalidEventType")
        kind = EventType(raw_type)
        mode = _mode(body)
        sample = body.get("samplePayload")
        if sample is not None and not isinstance(sample, dict):
            raise Refusal(400, "samplePayload must be an object.", "invalidSamplePayload")
        target = _key_id(body) or api_key_id(key)
        payload = self._sample(kind, target)
        payload.update(sample or {})
        payload.update({"eventType": kind.value, "apiKeyId": target,
                        "eventId": self.sender.new_id("evt")})
        try:
            event = GenerationEvent.from_payload(payload)
        except EventError as exc:
            raise Refusal(400, f"samplePayload: {exc.message}.", "invalidSamplePayload") from None
        try:
            message_id = self.sender.send_test(event, mode=mode)
        except LookupError:
            raise Refusal(404, "No webhook endpoint is configured for this key, mode and event "
                          "type.", "webhookNotConfigured") from None
        return {"svixMessageId": message_id, "eventId": event.event_id,
                "eventType": kind.value, "mode": mode, "apiKeyId": target}

    def _sample(self, kind: EventType, key_id: str) -> Body:
        status = STATUS_OF[kind]
        failed = kind is EventType.FAILED
        return {
            "createdAt": format_time(datetime.fromtimestamp(self.wall(), UTC)),
            "apiKeyId": key_id,
            "apiProjectId": "proj_test",
            "generationId": "gen_test",
            "status": status.value,
            "hasVideo": False,
            "modelKey": "diffio-4.6-flash",
            "error": "Test failure." if failed else None,
            "errorDetails": "A test event; no generation failed." if failed else None,
        }


def add_webhook_routes(
    app: web.Application,
    sender: WebhookSender,
    keys: KeyStore,
    admin_keys: Mapping[str, Collection[str]],
    *,
    wall: Callable[[], float] = time.time,
) -> WebhookAdminRoutes:
    """Mount the two webhook admin endpoints on the simulator's ``app``.

    ``keys`` is the simulator's key store (``SimState`` has ``key_spec``);
    ``admin_keys`` maps a key to its admin scopes (it needs ``webhooks:write``).
    These are plain routes; aiohttp resolves plain paths before the
    simulator's ``/v1/{endpoint}`` catch-all whatever the order they were added in.
    """
    routes = WebhookAdminRoutes(sender, keys, admin_keys, wall=wall)
    app.router.add_routes(routes.routes())
    return routes


def _mode(body: Body) -> str:
    mode = body.get("mode")
    if mode not in MODES:
        raise Refusal(400, "mode must be test or live.", "invalidMode")
    assert isinstance(mode, str)
    return mode


def _key_id(body: Body) -> str | None:
    value = body.get("apiKeyId")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise Refusal(400, "apiKeyId must be a non-empty string.", "invalidApiKeyId")
    return value.strip()


def _allowed_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    if not host:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _read_json(request: web.Request) -> Body:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, "Invalid JSON body.", "invalidJson") from None
    if not isinstance(body, dict):
        raise Refusal(400, "Invalid JSON body.", "invalidJson")
    return body

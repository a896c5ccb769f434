"""The ``/v1`` dispatcher: checks in the order of a real server, then the work.

Order for every request: route (404; which routes exist depends on the API
generation served, see ``endpoints.py``), method (OPTIONS 204, else 405
unless POST), latency, auth (401/403), rate limit (429), injected 500 / HTML
502, JSON (400), then the endpoint: a retired model (410), field validation
(400), existence and ownership (404/403), upload confirmation (409), idempotency
replay, spend limit (402), create. Lost and truncated answers are decided
after the work is done, which is the point of them.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping

from aiohttp import web

from batcher.simulator.endpoints import Body, Call, Endpoint, Endpoints, endpoint_for
from batcher.simulator.model import Refusal
from batcher.simulator.state import SimState
from batcher.simulator.window import RateLimiter
from batcher.simulator.wire import json_object, roll

__all__ = ["ApiRoutes", "presented_key"]

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Api-Key, Xi-Api-Key",
    "Access-Control-Max-Age": "3600",
}
HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key of a request: ``Authorization: Bearer``, then ``X-Api-Key``, ``Xi-Api-Key``."""
    auth = headers.get("Authorization", "").strip()
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for name in ("X-Api-Key", "Xi-Api-Key"):
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


def _json(status: int, body: Body, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


class ApiRoutes:
    """Handlers of ``/v1/{endpoint}``, bound to one simulator's state."""

    def __init__(
        self, state: SimState, endpoints: Endpoints, limiter: RateLimiter, rng: random.Random
    ) -> None:
        self.state = state
        self.endpoints = endpoints
        self.limiter = limiter
        self.rng = rng

    def add_to(self, app: web.Application) -> None:
        """Register ``/v1/…`` (every method, every path below it) on ``app``."""
        app.router.add_route("*", "/v1/{endpoint:.*}", self.dispatch)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Answer one API request and count it."""
        name = request.match_info["endpoint"]
        key = presented_key(request.headers)
        stats = self.state.stats
        stats.arrival(key, self.state.clock())
        endpoint = endpoint_for(self.state.config.api, name)
        label = name if endpoint is not None else "unknown"
        try:
            response, status = await self._answer(request, endpoint, key)
        except Refusal as refusal:
            response = _json(refusal.status, refusal.body, refusal.headers)
            status = refusal.status
        stats.answered(label, status)
        return response

    async def _answer(
        self, request: web.Request, endpoint: Endpoint | None, key: str | None
    ) -> tuple[web.StreamResponse, int | str]:
        if endpoint is None:
            raise Refusal(404, "Not found.", "notFound")
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=CORS_HEADERS), 204
        if request.method != "POST":
            raise Refusal(405, "Method not allowed.", "methodNotAllowed",
                          headers={"Allow": "POST, OPTIONS"})
        cfg = self.state.config
        low, high = cfg.latency
        if high > 0:
            await asyncio.sleep(self.rng.uniform(low, high))
        key = self._authenticate(key, endpoint)
        self._rate_limit(key)
        if roll(self.rng, cfg.error_rate):
            self.state.stats.bump("errors_injected")
            raise Refusal(500, "Internal server error (injected by the simulator).",
                          "internalError")
        if roll(self.rng, cfg.html_rate):
            self.state.stats.bump("html_errors_injected")
            return web.Response(status=502, text=HTML_502, content_type="text/html"), 502
        body = await json_object(request)
        if body is None:
            raise Refusal(400, "Invalid JSON body.", "invalidJson")
        call = Call(key, body, str(request.url.origin()), request.match_info["endpoint"],
                    endpoint.model_key)
        result = endpoint.handler(self.endpoints, call)
        if endpoint.model_key is not None and roll(self.rng, self.state.config.lost_rate):
            # The generation exists and is charged; the client never hears of it.
            self.state.stats.bump("lost_responses")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=200), "lost"
        if roll(self.rng, self.state.config.truncated_rate):
            self.state.stats.bump("truncated_responses")
            raw = json.dumps(result).encode()
            cut = raw[: max(1, len(raw) // 2)]
            return web.Response(status=200, body=cut, content_type="application/json"), 200
        return _json(200, result), 200

    def _authenticate(self, key: str | None, endpoint: Endpoint) -> str:
        spec = self.state.key_spec(key) if key is not None else None
        if key is None or spec is None:
            raise Refusal(401, "Invalid API key.", "invalidApiKey")
        if not spec.active:
            raise Refusal(403, "API key is not active.", "apiKeyInactive")
        allowed = spec.write if endpoint.permission == "write" else spec.read
        if not allowed:
            raise Refusal(403, f"API key lacks {endpoint.permission} permission.",
                          "permissionDenied")
        return key

    def _rate_limit(self, key: str) -> None:
        limit = self.state.config.rate_limit
        if limit is None:
            return
        retry_after = self.limiter.admit(key, self.state.clock(), limit)
        if retry_after is not None:
            self.state.stats.bump("rate_limited")
            raise Refusal(429, "Rate limit exceeded.", "rateLimited",
                          headers={"Retry-After": str(retry_after)})

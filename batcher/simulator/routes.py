"""The ``/v1`` endpoints: checks in the order of a real server, then the work.

Order for every request: route (404), method (OPTIONS 204, else 405 unless
POST), latency, auth (401/403), rate limit (429), injected 500 / HTML 502,
JSON (400), field validation (400), existence and ownership (404/403),
idempotency replay, spend limit (402), create. Lost and truncated answers are
decided after the work is done, which is the point of them.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from batcher.simulator.model import Refusal
from batcher.simulator.state import SimState
from batcher.simulator.storage import StorageRoutes
from batcher.simulator.views import (
    download_body,
    generation_body,
    generation_summary,
    progress_body,
    project_created_body,
    project_summary,
)
from batcher.simulator.window import RateLimiter

__all__ = ["ENDPOINTS", "ApiRoutes", "presented_key"]

Body = dict[str, Any]
Handler = Callable[["ApiRoutes", str, Body, web.Request], Body]

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


def _string(body: Body, name: str, *, required: bool, code: str) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise Refusal(400, f"{name} must be a string.", code)
    return value


def _object(body: Body, name: str, code: str) -> Body:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refusal(400, f"{name} must be an object.", code)
    return value


def _idempotency_key(body: Body) -> str | None:
    value = body.get("idempotencyKey")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= 255:
        raise Refusal(
            400,
            "idempotencyKey must be a string of 1-255 characters after trimming.",
            "invalidIdempotencyKey",
        )
    return value.strip()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ``/v1`` endpoint: the permission it needs and what it does."""

    permission: str  # read | write
    handler: Handler
    model_key: str | None = None  # generation endpoints only


class ApiRoutes:
    """Handlers of ``/v1/{endpoint}``, bound to one simulator's state."""

    def __init__(
        self, state: SimState, storage: StorageRoutes, limiter: RateLimiter, rng: random.Random
    ) -> None:
        self.state = state
        self.storage = storage
        self.limiter = limiter
        self.rng = rng

    def add_to(self, app: web.Application) -> None:
        """Register ``/v1/…`` (every method, every path below it) on ``app``."""
        app.router.add_route("*", "/v1/{endpoint:.*}", self.dispatch)

    def _roll(self, rate: float) -> bool:
        # No draw at rate 0, so turning a fault off keeps the other draws in step.
        return rate > 0 and self.rng.random() < rate

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Answer one API request and count it."""
        name = request.match_info["endpoint"]
        key = presented_key(request.headers)
        stats = self.state.stats
        stats.arrival(key, self.state.clock())
        endpoint = ENDPOINTS.get(name)
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
        if self._roll(cfg.error_rate):
            self.state.stats.bump("errors_injected")
            raise Refusal(500, "Internal server error (injected by the simulator).",
                          "internalError")
        if self._roll(cfg.html_rate):
            self.state.stats.bump("html_errors_injected")
            return web.Response(status=502, text=HTML_502, content_type="text/html"), 502
        body = await self._read_json(request)
        result = endpoint.handler(self, key, body, request)
        if endpoint.model_key is not None and self._roll(self.state.config.lost_rate):
            # The generation exists and is charged; the client never hears of it.
            self.state.stats.bump("lost_responses")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=200), "lost"
        if self._roll(self.state.config.truncated_rate):
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

    async def _read_json(self, request: web.Request) -> Body:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Refusal(400, "Invalid JSON body.", "invalidJson") from None
        if not isinstance(body, dict):
            raise Refusal(400, "Invalid JSON body.", "invalidJson")
        return body

    # -- endpoint handlers -------------------------------------------------

    def create_project(self, key: str, body: Body, request: web.Request) -> Body:
        """create_project: a project and its signed upload URL."""
        file_name = body.get("fileName")
        if not isinstance(file_name, str) or not file_name.strip():
            raise Refusal(400, "fileName is required and must be a string.", "invalidFileName")
        content_type = _string(body, "contentType", required=False, code="invalidContentType")
        length = body.get("contentLength")
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int | float) or length < 0
        ):
            raise Refusal(400, "contentLength must be a number >= 0.", "invalidContentLength")
        params = dict(_object(body, "params", "invalidParams"))
        file_format = _string(body, "fileFormat", required=False, code="invalidFileFormat")
        if file_format is not None:
            params.setdefault("fileFormat", file_format)
        project = self.state.create_project(
            key,
            file_name=file_name,
            content_type=content_type or "application/octet-stream",
            content_length=length,
            params=params,
        )
        url, expires = self.storage.upload_url(str(request.url.origin()), project.api_project_id)
        return project_created_body(
            project, user=self.state.user_of(key), upload_url=url, expires_wall=expires
        )

    def generate(self, key: str, body: Body, request: web.Request) -> Body:
        """``*-generation``: create, or replay by idempotency key."""
        project_id = _string(body, "apiProjectId", required=True, code="invalidApiProjectId")
        assert project_id is not None
        sampling = _object(body, "sampling", "invalidSampling")
        params = _object(body, "params", "invalidParams")
        idem = _idempotency_key(body)
        model_key = ENDPOINTS[request.match_info["endpoint"]].model_key
        assert model_key is not None
        gen, replay = self.state.submit(key, model_key, project_id, sampling, params, idem)
        return generation_body(gen, gen.phase(self.state.clock()), replay=replay)

    def progress(self, key: str, body: Body, request: web.Request) -> Body:
        """get_generation_progress."""
        gen_id = _string(body, "generationId", required=True, code="invalidGenerationId")
        project_id = _string(body, "apiProjectId", required=False, code="invalidApiProjectId")
        assert gen_id is not None
        gen = self.state.generation_for(key, gen_id, project_id)
        return progress_body(gen, gen.phase(self.state.clock()))

    def download(self, key: str, body: Body, request: web.Request) -> Body:
        """get_generation_download: a signed URL once the generation is complete."""
        gen_id = _string(body, "generationId", required=True, code="invalidGenerationId")
        project_id = _string(body, "apiProjectId", required=True, code="invalidApiProjectId")
        kind = _string(body, "downloadType", required=False, code="invalidDownloadType")
        if kind not in (None, "audio", "mp3", "video", "transcript"):
            raise Refusal(400, "downloadType must be audio, video or transcript.",
                          "invalidDownloadType")
        assert gen_id is not None and project_id is not None
        project = self.state.project_for(key, project_id)
        gen = self.state.generation_for(key, gen_id, project_id)
        if kind == "video":
            raise Refusal(404, "This project has no video.", "videoUnavailable")
        if kind == "transcript":
            raise Refusal(
                404,
                "No transcript is available for this generation.",
                "TRANSCRIPT_UNAVAILABLE",
                extra={"transcription": {"status": "unavailable"}},
            )
        status = gen.phase(self.state.clock()).status
        if status == "failed":
            raise Refusal(409, "The generation failed; there is nothing to download.",
                          "generationFailed")
        if status != "complete":
            raise Refusal(409, "The generation is not complete yet.", "generationNotComplete")
        url = self.storage.download_url(str(request.url.origin()), gen.generation_id)
        return download_body(gen, project, user=self.state.user_of(key), download_url=url)

    def list_projects(self, key: str, body: Body, request: web.Request) -> Body:
        """list_projects: the key's projects by creation time."""
        projects = [p for p in self.state.projects.values() if p.owner == key]
        projects.sort(key=lambda p: p.created_wall)
        return {"projects": [project_summary(p) for p in projects]}

    def list_generations(self, key: str, body: Body, request: web.Request) -> Body:
        """list_project_generations: a project's generations by creation time."""
        project_id = _string(body, "apiProjectId", required=True, code="invalidApiProjectId")
        assert project_id is not None
        project = self.state.project_for(key, project_id)
        now = self.state.clock()
        items = []
        for gen_id in project.generation_ids:
            gen = self.state.generations[gen_id]
            items.append(generation_summary(gen, gen.phase(now), now - gen.started))
        return {"apiProjectId": project.api_project_id, "generations": items}


ENDPOINTS: dict[str, Endpoint] = {
    "create_project": Endpoint("write", ApiRoutes.create_project),
    "diffio-3.5-generation": Endpoint("write", ApiRoutes.generate, "diffio-3.5"),
    # The seed: 3.4 is an alias of 3.5 and always answers modelKey diffio-3.5.
    "diffio-3.4-generation": Endpoint("write", ApiRoutes.generate, "diffio-3.5"),
    "diffio-2.0-generation": Endpoint("write", ApiRoutes.generate, "diffio-2"),
    "diffio-2.0-flash-generation": Endpoint("write", ApiRoutes.generate, "diffio-2-flash"),
    "get_generation_progress": Endpoint("read", ApiRoutes.progress),
    "get_generation_download": Endpoint("read", ApiRoutes.download),
    "list_projects": Endpoint("read", ApiRoutes.list_projects),
    "list_project_generations": Endpoint("read", ApiRoutes.list_generations),
}

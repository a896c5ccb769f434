"""The current API's upload host, served under ``/edge`` on the simulator's port.

create_project hands out ``edgeBaseUrl`` = ``http://HOST:PORT/edge`` and an
upload token; then, every call with ``Authorization: Bearer {uploadToken}``::

    POST {edge}/v1/uploads/start  {}
         -> {"uploadId", "partSizeBytes", "maxBytes"}
    PUT  {edge}/v1/uploads/parts/{n}?uploadId=…  (raw bytes, with Content-Length)
         -> {"partNumber", "etag"}
    POST {edge}/v1/uploads/complete  {"uploadId", "parts": [{"partNumber", "etag"}, …]}
         -> {"objectKey", "sizeBytes", "etag"}
    POST {edge}/v1/uploads/abort  {"uploadId"}
         -> {}

Errors answer ``{"error": {"code", "message"}}``: 401 ``invalid_token`` (no
or unknown token), 401 ``api_key_not_accepted`` (an API key arrived: counted
in ``api_keys_at_upload_host``), 403 ``upload_session_expired`` (the session's
lifetime, ``upload_session_ttl``, is over: create a new project), 403
``forbidden`` (another session's upload), 404 ``no_such_upload``, 409
``upload_confirmed`` (the project's upload is already confirmed), 411 (a part
without ``Content-Length``), 413 (a part over the part size, or bytes past
``maxBytes``), 400 for the rest (see ``uploads.py``). Part PUTs take the
``part_*`` fault knobs: latency, a 500 before the part is stored, and an
answer lost after it is stored.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from aiohttp import web

from batcher.simulator.state import SimState
from batcher.simulator.uploads import EdgeRefusal, UploadSession
from batcher.simulator.wire import json_object, roll

__all__ = ["EDGE_PREFIX", "EdgeRoutes"]

EDGE_PREFIX = "/edge"
_UPLOADS = "v1/uploads/"
_API_KEY_HEADERS = ("X-Api-Key", "Xi-Api-Key")
_METHODS = {"start": "POST", "parts": "PUT", "complete": "POST", "abort": "POST"}


class EdgeRoutes:
    """The upload host's four routes, bound to one simulator's state."""

    def __init__(self, state: SimState, rng: random.Random) -> None:
        self.state = state
        self.rng = rng

    def add_to(self, app: web.Application) -> None:
        """Register ``/edge/…`` on ``app``."""
        app.router.add_route("*", EDGE_PREFIX + "/{tail:.*}", self.dispatch)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Answer one upload host request and count it."""
        tail = request.match_info["tail"]
        action, _, rest = tail.removeprefix(_UPLOADS).partition("/")
        known = tail.startswith(_UPLOADS) and action in _METHODS
        label = f"edge:{action}" if known else "edge:unknown"
        try:
            response, status = await self._answer(request, action if known else None, rest)
        except EdgeRefusal as refusal:
            response = web.json_response(refusal.body, status=refusal.status)
            status = refusal.status
        self.state.stats.answered(label, status)
        return response

    async def _answer(
        self, request: web.Request, action: str | None, rest: str
    ) -> tuple[web.StreamResponse, int | str]:
        if action is None or (rest and action != "parts") or (action == "parts" and not rest):
            raise EdgeRefusal(404, "not_found", "no such upload route")
        method = _METHODS[action]
        if request.method != method:
            raise EdgeRefusal(405, "method_not_allowed", f"use {method} for uploads/{action}")
        session = self._session(request)
        if action == "parts":
            return await self._part(request, session, rest)
        body = await json_object(request)
        if body is None:
            raise EdgeRefusal(400, "bad_request", "the body must be a JSON object")
        handler = {"start": self._start, "complete": self._complete, "abort": self._abort}
        return web.json_response(handler[action](session, body)), 200

    def _session(self, request: web.Request) -> UploadSession:
        state = self.state
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if token in state.config.api_keys or any(
            request.headers.get(name, "").strip() for name in _API_KEY_HEADERS
        ):
            state.stats.bump("api_keys_at_upload_host")
            raise EdgeRefusal(401, "api_key_not_accepted",
                              "the upload host takes the upload token, never an API key")
        session = state.uploads.session_for(token) if token else None
        if session is None:
            raise EdgeRefusal(401, "invalid_token", "missing or unknown upload token")
        if state.wall() >= session.expires_wall(state.config.upload_session_ttl):
            state.stats.bump("upload_sessions_expired")
            raise EdgeRefusal(403, "upload_session_expired",
                              "the upload session has expired; create a new project to upload")
        return session

    def _refuse_if_confirmed(self, session: UploadSession) -> None:
        # Once confirmed, the project's file is what generations use: no
        # later upload may replace it.
        if self.state.projects[session.api_project_id].confirmed:
            raise EdgeRefusal(409, "upload_confirmed",
                              "this project's upload is already confirmed")

    def _start(self, session: UploadSession, body: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        self._refuse_if_confirmed(session)
        part_size = state.config.edge_part_size or session.part_size
        upload = state.uploads.start(state.new_id("upl"), session, part_size)
        state.stats.bump("uploads_started")
        return {"uploadId": upload.upload_id, "partSizeBytes": part_size,
                "maxBytes": session.max_bytes}

    async def _part(
        self, request: web.Request, session: UploadSession, number_text: str
    ) -> tuple[web.StreamResponse, int | str]:
        state, cfg = self.state, self.state.config
        low, high = cfg.part_latency
        if high > 0:
            await asyncio.sleep(self.rng.uniform(low, high))
        upload = state.uploads.upload_of(session, request.query.get("uploadId"))
        self._refuse_if_confirmed(session)
        if not number_text.isdigit():
            raise EdgeRefusal(400, "bad_request", f"not a part number: {number_text!r}")
        number = int(number_text)
        length = request.content_length
        if length is None:
            raise EdgeRefusal(411, "length_required", "parts need a Content-Length")
        upload.check_part(number, length)
        # Streamed, because client_max_size only guards JSON bodies.
        data = b"".join([chunk async for chunk in request.content.iter_chunked(1 << 16)])
        if roll(self.rng, cfg.part_error_rate):
            state.stats.bump("part_errors_injected")
            raise EdgeRefusal(500, "internal_error",
                              "internal error (injected by the simulator); the part was not stored")
        etag, again = upload.put_part(number, data)
        state.stats.bump("parts_received")
        if again:
            state.stats.bump("parts_resent")
        if roll(self.rng, cfg.part_lost_rate):
            # The part is stored; the client never hears so.
            state.stats.bump("part_responses_lost")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=200), "lost"
        return web.json_response({"partNumber": number, "etag": etag}), 200

    def _complete(self, session: UploadSession, body: dict[str, Any]) -> dict[str, Any]:
        upload = self.state.uploads.upload_of(session, body.get("uploadId"))
        if upload.status != "completed":
            self._refuse_if_confirmed(session)
        data = upload.complete(body.get("parts"))
        if data is not None:
            self.state.store_object(session.api_project_id, data)
            self.state.stats.bump("uploads_completed")
        return {"objectKey": session.object_key, "sizeBytes": upload.size, "etag": upload.etag}

    def _abort(self, session: UploadSession, body: dict[str, Any]) -> dict[str, Any]:
        upload = self.state.uploads.upload_of(session, body.get("uploadId"))
        if upload.status != "aborted":
            upload.abort()
            self.state.stats.bump("uploads_aborted")
        return {}

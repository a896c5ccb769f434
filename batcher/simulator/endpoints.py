"""What each ``/v1`` endpoint does, once the dispatcher has let the request through.

Which endpoints exist depends on the API generation served (``catalog.py``):
both have create_project, progress, download and the two lists; the seed
has its 3.5/2.0 generation endpoints; the current API has the 4.6 ones,
``complete_project_upload``, and a 410 ``model_retired`` for every other
``diffio-…-generation``. Handlers take a :class:`Call` and return the 200
body, or raise :class:`~batcher.simulator.model.Refusal`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batcher.simulator.catalog import CURRENT_MODELS, MODEL_ENDPOINTS, ApiGeneration, retired_model
from batcher.simulator.config import download_ttl_for
from batcher.simulator.edge import EDGE_PREFIX
from batcher.simulator.model import Refusal
from batcher.simulator.state import SimState
from batcher.simulator.storage import StorageRoutes
from batcher.simulator.views import (
    download_body,
    generation_body,
    generation_summary,
    object_path,
    progress_body,
    project_created_body,
    project_session_body,
    project_summary,
)

__all__ = ["Body", "Call", "Endpoint", "Endpoints", "endpoint_for"]

Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated request to an endpoint: who, what, and where it came in."""

    key: str
    body: Body
    origin: str  # scheme://host:port the client used, for URLs we hand out
    name: str  # the endpoint, e.g. "diffio-4.6-flash-generation"
    model_key: str | None  # generation endpoints: the modelKey stored


Handler = Callable[["Endpoints", Call], Body]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ``/v1`` endpoint: the permission it needs and what it does."""

    permission: str  # read | write
    handler: Handler
    model_key: str | None = None  # generation endpoints only


def _string(body: Body, name: str, *, required: bool, code: str) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise Refusal(400, f"{name} must be a string.", code)
    return value


def _required(body: Body, name: str, code: str) -> str:
    value = _string(body, name, required=True, code=code)
    assert value is not None
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


class Endpoints:
    """The endpoint handlers, bound to one simulator's state and storage."""

    def __init__(self, state: SimState, storage: StorageRoutes) -> None:
        self.state = state
        self.storage = storage

    def create_project(self, call: Call) -> Body:
        """create_project: a project and a signed upload URL (seed) or upload session (current)."""
        body = call.body
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
        state, cfg = self.state, self.state.config
        current = cfg.api == "current"
        if current and length is not None and length > cfg.max_upload_bytes:
            raise Refusal(413, f"contentLength exceeds the upload limit of "
                               f"{cfg.max_upload_bytes} bytes.", "UPLOAD_TOO_LARGE")
        project = state.create_project(
            call.key,
            file_name=file_name,
            content_type=content_type or "application/octet-stream",
            content_length=length,
            params=params,
            needs_confirmation=current,
        )
        user = state.user_of(call.key)
        if current:
            session = state.open_session(project, object_path(user, project))
            return project_session_body(
                project, session, edge_base_url=call.origin + EDGE_PREFIX,
                expires_wall=session.expires_wall(cfg.upload_session_ttl),
            )
        url, expires = self.storage.upload_url(call.origin, project.api_project_id)
        return project_created_body(project, user=user, upload_url=url, expires_wall=expires)

    def complete_project_upload(self, call: Call) -> Body:
        """complete_project_upload (current API): confirm a finished upload; idempotent."""
        project_id = _required(call.body, "apiProjectId", "invalidApiProjectId")
        project = self.state.confirm_upload(call.key, project_id)
        size = len(project.audio) if project.audio is not None else 0
        return {"apiProjectId": project.api_project_id, "status": "uploaded", "sizeBytes": size}

    def generate(self, call: Call) -> Body:
        """``*-generation``: create, or replay by idempotency key."""
        body = call.body
        project_id = _required(body, "apiProjectId", "invalidApiProjectId")
        sampling = _object(body, "sampling", "invalidSampling")
        params = _object(body, "params", "invalidParams")
        idem = _idempotency_key(body)
        assert call.model_key is not None
        gen, replay = self.state.submit(call.key, call.model_key, project_id, sampling, params,
                                        idem)
        return generation_body(gen, gen.phase(self.state.clock()), replay=replay)

    def retired(self, call: Call) -> Body:
        """A retired model's endpoint (current API): 410, nothing created or charged."""
        model = retired_model("current", call.name) or call.name
        self.state.stats.bump("retired_model_refusals")
        supported = " or ".join(CURRENT_MODELS)
        paths = " or ".join(f"/v1/{m}-generation" for m in CURRENT_MODELS)
        raise Refusal(
            410,
            f"{model} has been retired. Use {supported} ({paths}).",
            "model_retired",
            extra={"retiredModel": model, "supportedModels": list(CURRENT_MODELS)},
        )

    def progress(self, call: Call) -> Body:
        """get_generation_progress."""
        body = call.body
        gen_id = _required(body, "generationId", "invalidGenerationId")
        project_id = _string(body, "apiProjectId", required=False, code="invalidApiProjectId")
        gen = self.state.generation_for(call.key, gen_id, project_id)
        now = self.state.clock()
        return progress_body(gen, gen.phase(now), api=self.state.config.api,
                             queue_ahead=gen.queue_ahead(now))

    def download(self, call: Call) -> Body:
        """get_generation_download: a signed URL once the generation is complete."""
        body = call.body
        gen_id = _required(body, "generationId", "invalidGenerationId")
        project_id = _required(body, "apiProjectId", "invalidApiProjectId")
        kind = _string(body, "downloadType", required=False, code="invalidDownloadType")
        if kind not in (None, "audio", "mp3", "video", "transcript"):
            raise Refusal(400, "downloadType must be audio, video or transcript.",
                          "invalidDownloadType")
        project = self.state.project_for(call.key, project_id)
        gen = self.state.generation_for(call.key, gen_id, project_id)
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
        cfg = self.state.config
        url = self.storage.download_url(call.origin, gen.generation_id, download_ttl_for(cfg))
        return download_body(gen, project, user=self.state.user_of(call.key), download_url=url,
                             api=cfg.api)

    def list_projects(self, call: Call) -> Body:
        """list_projects: the key's projects by creation time."""
        projects = [p for p in self.state.projects.values() if p.owner == call.key]
        projects.sort(key=lambda p: p.created_wall)
        return {"projects": [project_summary(p) for p in projects]}

    def list_generations(self, call: Call) -> Body:
        """list_project_generations: a project's generations by creation time."""
        project_id = _required(call.body, "apiProjectId", "invalidApiProjectId")
        project = self.state.project_for(call.key, project_id)
        now = self.state.clock()
        items = []
        for gen_id in project.generation_ids:
            gen = self.state.generations[gen_id]
            items.append(generation_summary(gen, gen.phase(now), now - gen.started))
        return {"apiProjectId": project.api_project_id, "generations": items}


_COMMON: dict[str, Endpoint] = {
    "create_project": Endpoint("write", Endpoints.create_project),
    "get_generation_progress": Endpoint("read", Endpoints.progress),
    "get_generation_download": Endpoint("read", Endpoints.download),
    "list_projects": Endpoint("read", Endpoints.list_projects),
    "list_project_generations": Endpoint("read", Endpoints.list_generations),
}

_TABLES: dict[ApiGeneration, dict[str, Endpoint]] = {
    api: {
        **_COMMON,
        **{name: Endpoint("write", Endpoints.generate, model)
           for name, model in MODEL_ENDPOINTS[api].items()},
    }
    for api in MODEL_ENDPOINTS
}
_TABLES["current"]["complete_project_upload"] = Endpoint(
    "write", Endpoints.complete_project_upload
)
_RETIRED = Endpoint("write", Endpoints.retired)


def endpoint_for(api: ApiGeneration, name: str) -> Endpoint | None:
    """The endpoint ``/v1/{name}`` of API generation ``api``, or None (404)."""
    found = _TABLES[api].get(name)
    if found is None and retired_model(api, name) is not None:
        return _RETIRED
    return found

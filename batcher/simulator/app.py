"""The :class:`Simulator`: state, knobs, stats and the aiohttp application.

Routes::

    /v1/{endpoint}                 the Diffio API of the generation served
                                   (routes.py dispatches, endpoints.py answers)
    /edge/v1/uploads/...           the current API's upload host (edge.py)
    /_storage/upload/{project}     the seed's signed PUT of a project's file (storage.py)
    /_storage/download/{gen}/...   signed GET of a restored file (storage.py)
    GET  /_sim/stats               SimStats as JSON           (no auth)
    GET  /_sim/config              the knobs as JSON          (no auth)
    POST /_sim/config              patch knobs, e.g. {"error_rate": 0} or {"api": "seed"}
    POST /_sim/projects            add a ready project {"apiKey", "apiProjectId", "audioBase64"?}

Every request but the ``/_sim`` ones has its User-Agent counted
(``SimStats.user_agents``).
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from batcher.errors import ConfigError
from batcher.simulator.config import KeySpec, SimConfig
from batcher.simulator.edge import EdgeRoutes
from batcher.simulator.endpoints import Endpoints
from batcher.simulator.routes import ApiRoutes
from batcher.simulator.state import SimState
from batcher.simulator.stats import SimStats, StatsRecorder
from batcher.simulator.storage import StorageRoutes, UrlSigner
from batcher.simulator.timeline import GenerationObserver
from batcher.simulator.window import RateLimiter

__all__ = ["Simulator"]

# Uploads are streamed past this limit; only JSON bodies are held to it.
_MAX_JSON_BODY = 8 * 1024 * 1024


class Simulator:
    """The embedded Diffio API: in-memory state plus ``.app`` to serve it.

    ``clock`` (monotonic seconds) drives generation progress, the rate limit
    and the 1 s window stat; ``wall`` (unix seconds) drives timestamps, URL
    expiry and the spend period. Serve it with
    :func:`batcher.simulator.server.run_simulator` or any aiohttp runner.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._config = config if config is not None else SimConfig()
        self._rng = random.Random(self._config.seed)
        self._recorder = StatsRecorder()
        self.state = SimState(self._config, self._recorder, self._rng, clock, wall)
        self._storage = StorageRoutes(self.state, UrlSigner(self._rng.randbytes(32)))
        self._api = ApiRoutes(
            self.state, Endpoints(self.state, self._storage), RateLimiter(), self._rng
        )
        self._edge = EdgeRoutes(self.state, self._rng)
        #: ``http://HOST:PORT/v1`` once served by ``run_simulator``.
        self.base_url: str | None = None
        self.app = self._build_app()

    def __repr__(self) -> str:
        return (
            f"Simulator(api={self._config.api!r}, base_url={self.base_url!r},"
            f" projects={len(self.state.projects)},"
            f" generations={len(self.state.generations)}, keys={len(self._config.api_keys)})"
        )

    @property
    def config(self) -> SimConfig:
        """The knobs in force."""
        return self._config

    @property
    def stats(self) -> SimStats:
        """A snapshot of everything counted so far."""
        return self._recorder.snapshot()

    def add_project(self, api_key: str, api_project_id: str, audio: bytes | None = None) -> None:
        """Make ``api_project_id`` exist, uploaded and owned by ``api_key``.

        With ``audio`` the project behaves as if that file had been uploaded
        (WAV pricing, restoration of those bytes); without, it is priced flat
        and its restoration derives from the id.
        """
        self.state.add_project(api_key, api_project_id, audio)

    def add_observer(self, observer: GenerationObserver) -> None:
        """Tell ``observer`` each new generation's planned timeline (see ``timeline.py``)."""
        self.state.observers.append(observer)

    def update_config(self, **changes: Any) -> SimConfig:
        """Change knobs mid-run (``SimConfig.patched`` semantics); returns the new config."""
        return self._apply(self._config.patched(changes))

    def set_key(self, key: str, spec: KeySpec) -> None:
        """Add or replace one API key."""
        self._apply(self._config.patched({"api_keys": {key: spec}}))

    def _apply(self, config: SimConfig) -> SimConfig:
        if config.seed != self._config.seed:
            self._rng.seed(config.seed)
        self._config = config
        self.state.config = config
        return config

    # -- the application ---------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_JSON_BODY, middlewares=[self._count_agent])
        self._api.add_to(app)
        self._edge.add_to(app)
        self._storage.add_to(app)
        app.router.add_get("/_sim/stats", self._get_stats)
        app.router.add_get("/_sim/config", self._get_config)
        app.router.add_get("/_sim/generations", self._get_generations)
        app.router.add_post("/_sim/config", self._post_config)
        app.router.add_post("/_sim/projects", self._post_project)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    @web.middleware
    async def _count_agent(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if not request.path.startswith("/_sim/"):
            self._recorder.user_agent(request.headers.get("User-Agent"))
        return await handler(request)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_dict())

    async def _get_generations(self, request: web.Request) -> web.Response:
        # When each generation was created and (will have) ended, in wall
        # time: the benchmark measures how long after its end a client noticed.
        gens = [{"generationId": g.generation_id, "createdAt": g.created_wall,
                 "endsAt": g.created_wall + (g.ends_at - g.started)}
                for g in self.state.generations.values()]
        return web.json_response({"generations": gens})

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self._config.to_dict())

    async def _control_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise ConfigError("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ConfigError("the body must be a JSON object")
        return body

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            body = await self._control_body(request)
            config = self._apply(self._config.patched(body))
        except ConfigError as exc:
            return web.json_response({"error": str(exc), "code": "invalidConfig"}, status=400)
        return web.json_response(config.to_dict())

    async def _post_project(self, request: web.Request) -> web.Response:
        try:
            body = await self._control_body(request)
            key, project_id = body.get("apiKey"), body.get("apiProjectId")
            if not isinstance(key, str) or not isinstance(project_id, str) or not project_id:
                raise ConfigError("apiKey and apiProjectId must be strings")
            encoded = body.get("audioBase64")
            audio = base64.b64decode(encoded, validate=True) if encoded is not None else None
            self.state.add_project(key, project_id, audio)
        except (ConfigError, ValueError, TypeError, binascii.Error) as exc:
            return web.json_response({"error": str(exc), "code": "invalidProject"}, status=400)
        return web.json_response({"apiProjectId": project_id})

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "Not found.", "code": "notFound"}, status=404)

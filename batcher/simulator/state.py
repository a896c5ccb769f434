"""The simulator's in-memory API state and its rules.

Ownership, idempotency, upload confirmation, billing and the spend limit
live here, free of HTTP: the handlers in ``endpoints.py`` and ``edge.py``
validate the request shape and call in, and every refusal comes back as a
:class:`~batcher.simulator.model.Refusal`.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from batcher.simulator.audio import wav_duration_seconds
from batcher.simulator.billing import SpendBook
from batcher.simulator.config import KeySpec, SimConfig
from batcher.simulator.model import QUEUED_END, STAGES, Generation, Project, Refusal
from batcher.simulator.stats import StatsRecorder, logical_request_key
from batcher.simulator.timeline import GenerationObserver, notify
from batcher.simulator.uploads import UploadBook, UploadSession

__all__ = ["MIN_BILLED_SECONDS", "SimState", "derived_generation_id", "iso"]

MIN_BILLED_SECONDS = 60.0


def iso(wall: float) -> str:
    """UTC ISO-8601 with a ``Z``, to the second, as the API writes times."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def derived_generation_id(api_key: str, api_project_id: str, idempotency_key: str) -> str:
    """The generation id the seed derives from (API key, apiProjectId, trimmed key)."""
    material = "\x00".join((api_key, api_project_id, idempotency_key.strip()))
    return "gen-" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:24]


def _period(wall: float) -> tuple[datetime, datetime]:
    now = datetime.fromtimestamp(wall, UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
        month=start.month + 1
    )
    return start, end


class SimState:
    """Projects, generations and charges of every key, in memory."""

    def __init__(
        self,
        config: SimConfig,
        stats: StatsRecorder,
        rng: random.Random,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.config = config
        self.stats = stats
        self.rng = rng
        self.clock = clock
        self.wall = wall
        self.projects: dict[str, Project] = {}
        self.generations: dict[str, Generation] = {}
        # logical request key -> its generations, oldest first
        self.logical: dict[str, list[str]] = {}
        self.uploads = UploadBook()
        #: Told each new generation's timeline (see ``timeline.py``).
        self.observers: list[GenerationObserver] = []
        self._users: dict[str, str] = {}
        self._book = SpendBook()
        # Clock times at which the generations still queued leave the queue.
        self._queue: list[float] = []

    # -- keys and projects -------------------------------------------------

    def key_spec(self, api_key: str) -> KeySpec | None:
        """The key's settings, or None when the simulator does not know it."""
        return self.config.api_keys.get(api_key)

    def user_of(self, api_key: str) -> str:
        """A stable pseudonymous user id for object paths (never the key itself)."""
        return self._users.setdefault(api_key, f"user-{len(self._users) + 1}")

    def new_id(self, prefix: str, bits: int = 96) -> str:
        """A fresh random id such as ``proj-…`` (from the seeded random source)."""
        return f"{prefix}-{self.rng.getrandbits(bits):0{bits // 4}x}"

    def create_project(
        self,
        owner: str,
        *,
        file_name: str,
        content_type: str,
        content_length: float | None,
        params: dict[str, Any],
        needs_confirmation: bool = False,
    ) -> Project:
        """A new project waiting for its upload (and, in the current API, its confirmation)."""
        now = self.wall()
        project = Project(
            api_project_id=self.new_id("proj"),
            owner=owner,
            file_name=file_name,
            content_type=content_type,
            content_length=content_length,
            params=params,
            created_wall=now,
            updated_wall=now,
            upload_expected=True,
            needs_confirmation=needs_confirmation,
        )
        self.projects[project.api_project_id] = project
        self.stats.bump("projects_created")
        return project

    def open_session(self, project: Project, object_key: str) -> UploadSession:
        """The upload session create_project hands out in the current API."""
        cfg = self.config
        session = UploadSession(
            session_id=self.new_id("upls"),
            token=self.new_id("upt", 192),
            api_project_id=project.api_project_id,
            object_key=object_key,
            part_size=cfg.part_size,
            max_bytes=cfg.max_upload_bytes,
            created_wall=self.wall(),
        )
        return self.uploads.open_session(session)

    def store_object(self, api_project_id: str, data: bytes) -> None:
        """A multipart upload completed: the project's file is stored, not yet confirmed."""
        project = self.projects[api_project_id]
        project.audio = data
        project.updated_wall = self.wall()

    def confirm_upload(self, owner: str, api_project_id: str) -> Project:
        """complete_project_upload: 409 ``UPLOAD_MISSING`` until an upload completed.

        Idempotent; projects that need no confirmation (seed uploads, projects
        that exist "already") answer as confirmed once their file is there.
        """
        project = self.project_for(owner, api_project_id)
        self.stats.bump("complete_project_upload_calls")
        if project.ready:
            return project
        if project.audio is None:
            raise Refusal(409, "Upload has not completed yet.", "UPLOAD_MISSING")
        project.confirmed = True
        project.updated_wall = self.wall()
        self.stats.bump("projects_confirmed")
        return project

    def add_project(self, owner: str, api_project_id: str, audio: bytes | None) -> Project:
        """An existing, uploaded project (for apiProjectId rows)."""
        known = self.projects.get(api_project_id)
        if known is not None and known.owner != owner:
            raise ValueError(f"project {api_project_id} belongs to another key")
        now = self.wall()
        name = f"{api_project_id}.wav" if audio is not None else "diffio_ai_upload.wav"
        project = Project(
            api_project_id=api_project_id,
            owner=owner,
            file_name=name,
            content_type="audio/wav" if audio is not None else "application/octet-stream",
            content_length=len(audio) if audio is not None else None,
            params={},
            created_wall=known.created_wall if known else now,
            updated_wall=now,
            upload_expected=False,
            audio=audio,
            generation_ids=known.generation_ids if known else [],
        )
        self.projects[api_project_id] = project
        return project

    def store_upload(self, api_project_id: str, data: bytes) -> None:
        """The signed PUT arrived: keep the bytes, the project is ``uploaded``."""
        project = self.projects[api_project_id]
        project.audio = data
        project.updated_wall = self.wall()
        self.stats.bump("uploads")

    def project_for(self, owner: str, api_project_id: str, *, create: bool = False) -> Project:
        """The caller's project; 404 when unknown, 403 when another key owns it."""
        project = self.projects.get(api_project_id)
        if project is None:
            if create and api_project_id:
                return self.add_project(owner, api_project_id, None)
            raise Refusal(404, "API project not found.", "projectNotFound")
        if project.owner != owner:
            raise Refusal(403, "This API key does not own the project.", "forbidden")
        return project

    def generation_for(
        self, owner: str, generation_id: str, api_project_id: str | None = None
    ) -> Generation:
        """The caller's generation: 404 if unknown or not in that project, 403 if not owned."""
        gen = self.generations.get(generation_id)
        if gen is None or (api_project_id is not None and gen.api_project_id != api_project_id):
            raise Refusal(404, "Generation not found.", "generationNotFound")
        if gen.owner != owner:
            raise Refusal(403, "This API key does not own the project.", "forbidden")
        return gen

    # -- generations and billing -------------------------------------------

    def estimate_usd(self, project: Project) -> float:
        """The charge for one generation on ``project`` (see ``SimConfig`` prices)."""
        seconds = wav_duration_seconds(project.audio) if project.audio is not None else None
        if seconds is None:
            return round(self.config.flat_price, 6)
        return round(self.config.price_per_second * max(MIN_BILLED_SECONDS, seconds), 6)

    def spend(self, owner: str) -> tuple[float, float]:
        """(used, pending) USD of ``owner`` in the current monthly period."""
        start, _ = _period(self.wall())
        return self._book.totals(owner, self.clock(), start.timestamp())

    def _check_spend(self, owner: str, estimate: float) -> None:
        spec = self.key_spec(owner)
        limit = spec.spend_limit_usd if spec is not None else None
        if limit is None:
            return
        used, pending = self.spend(owner)
        if round(used + pending + estimate, 9) <= limit:
            return
        start, end = _period(self.wall())
        self.stats.bump("spend_limit_refusals")
        raise Refusal(
            402,
            "Spend limit exceeded for this API key.",
            "spendLimitExceeded",
            extra={
                "currency": "USD",
                "spendLimitUsd": limit,
                "estimatedCostUsd": estimate,
                "usedUsd": used,
                "pendingUsd": pending,
                "periodStart": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "periodEnd": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )

    def submit(
        self,
        owner: str,
        model_key: str,
        api_project_id: str,
        sampling: dict[str, Any],
        params: dict[str, Any],
        idempotency_key: str | None,
    ) -> tuple[Generation, bool]:
        """Create (and charge) a generation, or replay the one the key names.

        Returns ``(generation, replayed)``. Order of checks as the seed's
        server: ownership/existence, idempotency replay (free, no spend
        check), spend limit, create.
        """
        project = self.project_for(owner, api_project_id, create=self.config.auto_create_projects)
        if self.config.api == "current" and not project.ready:
            self.stats.bump("generations_upload_missing")
            raise Refusal(409, "Upload the project file before creating a generation.",
                          "UPLOAD_MISSING")
        gen_id = None
        if idempotency_key is not None:
            gen_id = derived_generation_id(owner, api_project_id, idempotency_key)
            existing = self.generations.get(gen_id)
            if existing is not None:
                if existing.model_key != model_key:
                    raise Refusal(
                        409,
                        "Idempotency key was already used with a different model on this project.",
                        "idempotencyKeyConflict",
                    )
                self.stats.bump("generations_replayed")
                return existing, True
        estimate = self.estimate_usd(project)
        self._check_spend(owner, estimate)
        return self._create(project, owner, model_key, sampling, params, idempotency_key,
                            gen_id or self.new_id("gen"), estimate), False

    def _create(
        self,
        project: Project,
        owner: str,
        model_key: str,
        sampling: dict[str, Any],
        params: dict[str, Any],
        idempotency_key: str | None,
        gen_id: str,
        charge: float,
    ) -> Generation:
        cfg = self.config
        low, high = cfg.duration
        duration = self.rng.uniform(low, high) if high > low else low
        failed_stage = None
        if cfg.failure_rate > 0 and self.rng.random() < cfg.failure_rate:
            failed_stage = self.rng.choice(STAGES)
        if not project.ready:
            self.stats.bump("generations_without_upload")
        logical = logical_request_key(model_key, project.source(), sampling, params)
        now = self.clock()
        gen = Generation(
            generation_id=gen_id,
            api_project_id=project.api_project_id,
            owner=owner,
            model_key=model_key,
            idempotency_key=idempotency_key,
            sampling=sampling,
            params=params,
            started=now,
            created_wall=self.wall(),
            duration=duration,
            failed_stage=failed_stage,
            charge_usd=charge,
            logical_key=logical,
            source_bytes=project.source_bytes(),
            queue_position=self._join_queue(now, now + QUEUED_END * duration),
        )
        earlier = self.logical.setdefault(logical, [])
        if not earlier:
            kind = "first"
        elif any(self.generations[g].phase(now).status != "failed" for g in earlier):
            kind = "extra"
        else:
            kind = "retry"
        earlier.append(gen_id)
        self.generations[gen_id] = gen
        project.generation_ids.append(gen_id)
        project.updated_wall = gen.created_wall
        self._book.record(gen, _period(gen.created_wall)[0].timestamp())
        self.stats.bump("generations_created")
        self.stats.charge(owner, charge, logical, kind=kind)
        notify(self.observers, gen)
        return gen

    def _join_queue(self, now: float, leaves_at: float) -> int:
        """A new generation's place in the queue: 1 + those of every key still in it."""
        while self._queue and self._queue[0] <= now:
            heapq.heappop(self._queue)
        heapq.heappush(self._queue, leaves_at)
        return len(self._queue)

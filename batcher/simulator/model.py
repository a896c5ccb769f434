"""The simulator's records: projects, generations, and how a generation ages.

A generation's status is not stored: it is a pure function of the injected
clock (seconds since it was created against its drawn duration), so a test
that moves the clock moves every generation with it. The clock times at
which the status changes (``processing_at``, ``ends_at``) are the same
numbers :meth:`Generation.phase` compares against, so an observer told
"processing at t" sees ``processing`` when it asks at t.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from batcher.simulator.audio import project_source_bytes

__all__ = ["STAGES", "Generation", "Phase", "Project", "Refusal"]

# Fractions of a generation's duration: queued until 10 %, preProcessing until
# 30 %, inference until 100 %. A preProcessing failure ends it at 30 %.
QUEUED_END = 0.1
PRE_END = 0.3
STAGES = ("preProcessing", "inference")


class Refusal(Exception):
    """An API error answer: HTTP status and the JSON body ``{"error", "code"?, ...}``."""

    def __init__(
        self,
        status: int,
        error: str,
        code: str | None = None,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.body: dict[str, Any] = {"error": error}
        if code is not None:
            self.body["code"] = code
        self.body.update(extra or {})
        self.headers = headers or {}


@dataclass
class Project:
    """A Diffio project owned by one API key."""

    api_project_id: str
    owner: str
    file_name: str
    content_type: str
    content_length: float | None
    params: dict[str, Any]
    created_wall: float
    updated_wall: float
    # False for projects that exist "already" (add_project, auto-created):
    # generating on them without an upload is normal, not worth a stat.
    upload_expected: bool
    audio: bytes | None = None
    generation_ids: list[str] = field(default_factory=list)
    # True for projects of the current API: their upload counts only once
    # complete_project_upload has confirmed it (``confirmed``).
    needs_confirmation: bool = False
    confirmed: bool = False

    @property
    def ready(self) -> bool:
        """True once the project's file is in place for a generation.

        Seed projects are ready when the signed PUT arrived; current ones
        when complete_project_upload confirmed the finished upload; projects
        that exist "already" always are.
        """
        if not self.upload_expected:
            return True
        if self.needs_confirmation:
            return self.confirmed
        return self.audio is not None

    @property
    def status(self) -> str:
        """``uploading`` until the project is :attr:`ready`, then ``uploaded``."""
        return "uploaded" if self.ready else "uploading"

    def source(self) -> str:
        """sha256 hex of the uploaded bytes, or the project id when there are none."""
        if self.audio is None:
            return self.api_project_id
        return hashlib.sha256(self.audio).hexdigest()

    def source_bytes(self) -> bytes:
        """The input the fake restoration works on."""
        return self.audio if self.audio is not None else project_source_bytes(self.api_project_id)


@dataclass(frozen=True, slots=True)
class Phase:
    """A generation's state at one instant."""

    status: str  # queued | processing | complete | failed
    progress: int  # overall 0-100
    stages: dict[str, dict[str, Any]]
    error: str | None
    error_details: str | None
    ended_after: float | None  # seconds after creation when it became terminal


@dataclass
class Generation:
    """A generation: its request, its drawn fate, and its charge."""

    generation_id: str
    api_project_id: str
    owner: str
    model_key: str
    idempotency_key: str | None
    sampling: dict[str, Any]
    params: dict[str, Any]
    started: float  # injected clock at creation
    created_wall: float
    duration: float
    failed_stage: str | None  # None: it will complete
    charge_usd: float
    logical_key: str
    source_bytes: bytes
    # 1 + the generations (of every key) still queued when this one was created.
    queue_position: int = 1

    @property
    def processing_at(self) -> float:
        """Clock time at which it leaves the queue (``processing``)."""
        return self.started + QUEUED_END * self.duration

    @property
    def ends_at(self) -> float:
        """Clock time at which it becomes ``complete`` or ``failed``."""
        fraction = PRE_END if self.failed_stage == "preProcessing" else 1.0
        return self.started + fraction * self.duration

    def final_phase(self) -> Phase:
        """The terminal phase it reaches at :attr:`ends_at`."""
        return self.phase(math.inf)

    def queue_ahead(self, now: float) -> int:
        """Its place in the queue at ``now``: 1 is next; 0 once it has left the queue.

        The place it took at creation shrinks evenly until ``processing_at``.
        """
        if now >= self.processing_at:
            return 0
        span = self.processing_at - self.started
        left = 1.0 if span <= 0 else min(1.0, (self.processing_at - now) / span)
        return max(1, math.ceil(self.queue_position * left))

    def phase(self, now: float) -> Phase:
        """Where this generation is at clock time ``now``."""
        d = self.duration
        elapsed = max(0.0, now - self.started)
        frac = 1.0 if d <= 0 else min(1.0, elapsed / d)
        fail_at = PRE_END if self.failed_stage == "preProcessing" else 1.0
        # Terminal and queue boundaries compare clock times, not fractions, so
        # float rounding cannot put ``phase(ends_at)`` a hair before the end.
        if now >= self.ends_at:
            if self.failed_stage is not None:
                return self._failed(fail_at * d)
            done = {name: _stage(self, name, "complete", 100) for name in STAGES}
            return Phase("complete", 100, done, None, None, d)
        if now < self.processing_at:
            idle = {name: _stage(self, name, "pending", 0) for name in STAGES}
            return Phase("queued", 0, idle, None, None, None)
        if now < self.started + PRE_END * d:
            pre = round(100 * max(0.0, frac - QUEUED_END) / (PRE_END - QUEUED_END))
            stages = {
                "preProcessing": _stage(self, "preProcessing", "running", pre),
                "inference": _stage(self, "inference", "pending", 0),
            }
        else:
            inf = round(100 * (frac - PRE_END) / (1.0 - PRE_END))
            stages = {
                "preProcessing": _stage(self, "preProcessing", "complete", 100),
                "inference": _stage(self, "inference", "running", inf),
            }
        return Phase("processing", min(99, round(100 * frac)), stages, None, None, None)

    def _failed(self, ended_after: float) -> Phase:
        failed = self.failed_stage or "inference"
        where = "inference" if failed == "inference" else "pre-processing"
        error = f"Generation failed during {where}."
        details = f"Simulated failure in stage {failed} of generation {self.generation_id}."
        stages: dict[str, dict[str, Any]] = {}
        for name in STAGES:
            if name == failed:
                stages[name] = _stage(self, name, "failed", 100, error=error, details=details)
            elif STAGES.index(name) < STAGES.index(failed):
                stages[name] = _stage(self, name, "complete", 100)
            else:
                stages[name] = _stage(self, name, "pending", 0)
        return Phase("failed", 100, stages, error, details, ended_after)


_JOB_STATES = {
    "pending": "PENDING",
    "running": "RUNNING",
    "complete": "SUCCEEDED",
    "failed": "FAILED",
}
_MESSAGES = {"preProcessing": "Preparing audio", "inference": "Processing audio"}


def _stage(
    gen: Generation,
    name: str,
    status: str,
    progress: int,
    *,
    error: str | None = None,
    details: str | None = None,
) -> dict[str, Any]:
    started = status != "pending"
    suffix = "pre" if name == "preProcessing" else "run"
    return {
        "jobId": f"job-{suffix}-{gen.generation_id.removeprefix('gen-')[:12]}" if started else None,
        "jobState": _JOB_STATES[status],
        "status": status,
        "progress": progress,
        "statusMessage": _MESSAGES[name] if status == "running" else None,
        "error": error,
        "errorDetails": details,
    }

"""The vocabulary every part of batcher shares: row kinds, stages, rows.

A row's life is a small state machine: :class:`Stage` says where it is,
:data:`LEGAL_MOVES` which moves exist, and every ledger write is a
compare-and-set along one of them. The manifest side hands rows to the ledger
as :class:`NewRow`; the ledger hands back :class:`LedgerRow`.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypedDict

__all__ = [
    "ACTIVE_STAGES",
    "LEGAL_MOVES",
    "READER_COMMAND",
    "UPDATE_COLUMNS",
    "Event",
    "Kind",
    "LedgerRow",
    "NewRow",
    "RunInfo",
    "Stage",
    "Update",
    "UploadPart",
    "UploadSession",
    "contract_status",
    "describe_stages",
    "legal_sources",
    "stage_set",
    "status_counts",
]


class Kind(StrEnum):
    """What a manifest row names."""

    API_PROJECT = "project"  # an existing Diffio project (apiProjectId column)
    FILE = "file"  # a local audio file: create project, upload, generate, download


class Stage(StrEnum):
    """Where a row is. Every write is a compare-and-set on this column."""

    # Imported; nothing the API could charge for has been accepted yet.
    PENDING = "pending"
    # File row: create_project answered; its id is durable (see LEGAL_MOVES) but the
    # upload is not confirmed, so no generation has been posted for it.
    PROJECT_CREATED = "project"
    # File row: bytes uploaded; a generation may now be posted on this project.
    UPLOADED = "uploaded"
    # The API accepted (or replayed) the generation; generation_id is known.
    SUBMITTED = "submitted"
    # The API reports `complete`; a file row still has to download its output.
    GENERATED = "generated"
    # Done. File rows: output on disk under its final name, sha256 recorded.
    COMPLETE = "complete"
    # Terminal failure with `error` set; only --retry-failed moves it again.
    FAILED = "failed"


# Stages in which the runner still has work to do.
ACTIVE_STAGES: frozenset[Stage] = frozenset(
    {Stage.PENDING, Stage.PROJECT_CREATED, Stage.UPLOADED, Stage.SUBMITTED, Stage.GENERATED}
)

# The legal moves. A same-stage move updates fields (attempts, apiStatus,
# a retryable error) without changing where the row is.
LEGAL_MOVES: Mapping[Stage, frozenset[Stage]] = {
    # PENDING -> UPLOADED/SUBMITTED/FAILED also: a duplicate takes over the
    # request of the row it followed (its key and project; see run.followers).
    Stage.PENDING: frozenset(
        {Stage.PENDING, Stage.PROJECT_CREATED, Stage.UPLOADED, Stage.SUBMITTED, Stage.FAILED}
    ),
    # PROJECT -> PROJECT also covers "upload URL expired: fresh project".
    Stage.PROJECT_CREATED: frozenset(
        {Stage.PROJECT_CREATED, Stage.UPLOADED, Stage.PENDING, Stage.FAILED}
    ),
    # UPLOADED/SUBMITTED/GENERATED -> PENDING: the source file's audio changed;
    # the row becomes a new request (new key, new project). The old generation
    # stays in the row's history.
    Stage.UPLOADED: frozenset({Stage.UPLOADED, Stage.SUBMITTED, Stage.PENDING, Stage.FAILED}),
    Stage.SUBMITTED: frozenset(
        {Stage.SUBMITTED, Stage.GENERATED, Stage.COMPLETE, Stage.PENDING, Stage.FAILED}
    ),
    Stage.GENERATED: frozenset({Stage.GENERATED, Stage.COMPLETE, Stage.PENDING, Stage.FAILED}),
    # COMPLETE -> GENERATED: a file row whose output vanished is downloaded again.
    # COMPLETE -> PENDING: its source file changed; it is a new request now.
    Stage.COMPLETE: frozenset({Stage.COMPLETE, Stage.GENERATED, Stage.PENDING}),
    # FAILED -> PENDING/UPLOADED/SUBMITTED: --retry-failed or a changed row.
    Stage.FAILED: frozenset(
        {Stage.FAILED, Stage.PENDING, Stage.UPLOADED, Stage.SUBMITTED, Stage.GENERATED}
    ),
}


def stage_set(expect: Stage | frozenset[Stage]) -> frozenset[Stage]:
    """``expect`` of :meth:`Ledger.transition` as a set of stages."""
    return frozenset({expect}) if isinstance(expect, Stage) else frozenset(expect)


def describe_stages(stages: frozenset[Stage]) -> str:
    """``failed|pending``: a stage set as error messages name it."""
    return "|".join(sorted(s.value for s in stages))


def legal_sources(expect: Stage | frozenset[Stage], to: Stage) -> frozenset[Stage]:
    """The stages of ``expect`` from which a move to ``to`` is legal.

    Backends compare-and-set only against these, so an illegal move can never
    be written, whatever stage the row turns out to be in.
    """
    return frozenset(s for s in stage_set(expect) if to in LEGAL_MOVES[s])


def contract_status(stage: Stage) -> str:
    """The export's ``status``: pending, submitted, complete or failed."""
    if stage in (Stage.PENDING, Stage.PROJECT_CREATED, Stage.UPLOADED):
        return "pending"
    if stage in (Stage.SUBMITTED, Stage.GENERATED):
        return "submitted"
    return stage.value


def status_counts(by_stage: Mapping[Stage, int]) -> dict[str, int]:
    """Rows by export ``status`` (every status present, zero or not), from rows by stage."""
    counts = {"pending": 0, "submitted": 0, "complete": 0, "failed": 0}
    for stage, n in by_stage.items():
        counts[contract_status(stage)] += n
    return counts


@dataclass(frozen=True, slots=True)
class UploadSession:
    """Where and how a file row's bytes go up in parts (the current API).

    ``create_project`` hands it out; the ledger keeps it with the project, so
    a killed run goes on with the same session while it is valid. ``token``
    is the upload host's credential for this one upload (never the API key);
    it is kept out of reprs and of the row's history. ``expires_at`` is the
    API's ISO-8601 time, or None when it gave none.
    """

    session_id: str
    edge_base_url: str
    token: str = field(repr=False)
    part_size: int
    max_bytes: int | None = None
    expires_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The session as the ledger stores it (a JSON object)."""
        return {"sessionId": self.session_id, "edgeBaseUrl": self.edge_base_url,
                "uploadToken": self.token, "partSizeBytes": self.part_size,
                "maxBytes": self.max_bytes, "expiresAt": self.expires_at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UploadSession:
        """The session :meth:`to_json` wrote."""
        return cls(session_id=str(data["sessionId"]), edge_base_url=str(data["edgeBaseUrl"]),
                   token=str(data["uploadToken"]), part_size=int(data["partSizeBytes"]),
                   max_bytes=data.get("maxBytes"), expires_at=data.get("expiresAt"))


@dataclass(frozen=True, slots=True)
class UploadPart:
    """One part the upload host confirmed: its number (from 1), its etag,
    and the size and sha256 of the bytes that were sent."""

    number: int
    etag: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class NewRow:
    """A manifest row as the planner hands it to the ledger.

    ``error`` is set for an invalid row: it is imported straight as FAILED.
    ``group`` identifies one logical request (the API's identity: key and
    source); the first row of a group leads it, later rows follow it.
    """

    row_id: str
    line: int
    kind: Kind
    idempotency_key: str | None
    model_key: str
    api_project_id: str | None = None
    source_path: str | None = None
    source_sha256: str | None = None
    source_size: int | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    output_rel: str | None = None
    explicit_key: bool = False
    # Canonical JSON of what the request asks for (model, source, sampling,
    # params); two rows with one key but different content are reported.
    request_digest: str = ""
    group: str | None = None
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """A row as the ledger holds it now."""

    row_id: str
    line: int
    kind: Kind
    stage: Stage
    idempotency_key: str | None
    model_key: str
    api_project_id: str | None = None
    generation_id: str | None = None
    api_status: str | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    source_path: str | None = None
    source_sha256: str | None = None
    source_size: int | None = None
    output_rel: str | None = None
    output_path: str | None = None
    output_sha256: str | None = None
    output_size: int | None = None
    upload_url: str | None = None
    upload_method: str | None = None
    upload_expires_at: str | None = None
    content_type: str | None = None
    # The current API's upload session of the project, and the multipart
    # upload started in it (its confirmed parts are kept beside the row).
    upload_session: UploadSession | None = None
    upload_id: str | None = None
    # The fleet queue position the last progress answer gave (1 is next),
    # while the generation waits; None once out of the queue or unknown.
    queue_position: int | None = None
    error: Mapping[str, Any] | None = None
    attempts: int = 0
    polls: int = 0
    retry_count: int = 0
    base_key: str | None = None
    explicit_key: bool = False
    request_digest: str = ""
    group: str | None = None
    leader_row_id: str | None = None
    retired: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    # Raised by every write of the row's content (transitions, an import that
    # fails or restarts it); a compare-and-set with the caller's copy of the
    # row compares it, so a stale copy never overwrites a newer write.
    version: int = 0

    @property
    def status(self) -> str:
        """The contract's status for this row."""
        return contract_status(self.stage)

    def export_record(self) -> dict[str, Any]:
        """One export record: the fields users and scripts rely on, and more."""
        return {
            "rowId": self.row_id,
            "line": self.line,
            "kind": self.kind.value,
            "idempotencyKey": self.idempotency_key,
            "apiProjectId": self.api_project_id,
            "generationId": self.generation_id,
            "modelKey": self.model_key,
            "status": self.status,
            "stage": self.stage.value,
            "apiStatus": self.api_status,
            "error": dict(self.error) if self.error else None,
            "output": self.output_path if self.kind is Kind.FILE else None,
            "outputSha256": self.output_sha256,
            "source": self.source_path,
            "sourceSha256": self.source_sha256,
            "attempts": self.attempts,
            "polls": self.polls,
            "retryCount": self.retry_count,
            "leaderRowId": self.leader_row_id,
            "version": self.version,
        }


class Update(TypedDict, total=False):
    """Columns a transition may set. Absent keys are left as they are."""

    idempotency_key: str | None
    base_key: str | None
    retry_count: int
    api_project_id: str | None
    generation_id: str | None
    api_status: str | None
    source_sha256: str | None
    source_size: int | None
    output_path: str | None
    output_sha256: str | None
    output_size: int | None
    upload_url: str | None
    upload_method: str | None
    upload_expires_at: str | None
    content_type: str | None
    upload_session: UploadSession | None
    upload_id: str | None
    queue_position: int | None
    error: Mapping[str, Any] | None
    attempts_delta: int  # added to attempts
    polls_delta: int  # added to polls
    leader_row_id: str | None
    # What the manifest row asks for: set together when the row's request
    # changes under its row id (a new request, see batcher.run.resume).
    kind: Kind
    model_key: str
    sampling: Mapping[str, Any]
    params: Mapping[str, Any]
    source_path: str | None
    output_rel: str | None
    explicit_key: bool
    request_digest: str
    group: str | None  # stored in the column group_key


# The Update keys that set a column (the deltas add instead); ``group`` sets
# ``group_key``.
UPDATE_COLUMNS: frozenset[str] = frozenset(Update.__optional_keys__) - {
    "attempts_delta",
    "polls_delta",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a row's append-only history."""

    row_id: str
    at: float
    from_stage: Stage | None
    to_stage: Stage
    event: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    run_id: str = ""


# The command of a RunInfo that only reads the ledger (status, export).
READER_COMMAND = "read"


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Who is running: recorded in the ledger's runs table and in its lock.

    :meth:`start` and :meth:`reader` are the one place a run's identity is made.
    """

    run_id: str
    pid: int
    host: str
    started_at: float
    command: str = ""

    @classmethod
    def start(cls, command: str = "") -> RunInfo:
        """This process as a new run: a fresh id, its pid, host and start time."""
        return cls(run_id=uuid.uuid4().hex, pid=os.getpid(), host=socket.gethostname(),
                   started_at=time.time(), command=command[:500])

    @classmethod
    def reader(cls) -> RunInfo:
        """This process as a reader of the ledger (``status``, ``export``)."""
        return cls(run_id=f"read-{uuid.uuid4().hex[:8]}", pid=os.getpid(),
                   host=socket.gethostname(), started_at=time.time(), command=READER_COMMAND)

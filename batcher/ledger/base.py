"""The ledger's vocabulary and the one interface every backend implements.

The ledger is the truth (DESIGN.md invariant 5): every step of every row is
committed here, in order, before the runner acts on it. The runner talks only
to :class:`Ledger`; SQLite, PostgreSQL and the in-memory backend all pass the
same contract tests (tests/test_ledger_contract.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypedDict

__all__ = [
    "ACTIVE_STAGES",
    "LEASE_TAKEN_OVER",
    "LEGAL_MOVES",
    "UPDATE_COLUMNS",
    "Event",
    "Kind",
    "LeasingLedger",
    "Ledger",
    "LedgerRow",
    "NewRow",
    "RunInfo",
    "Stage",
    "Update",
    "contract_status",
    "describe_stages",
    "legal_sources",
    "stage_set",
]


class Kind(StrEnum):
    """What a manifest row names."""

    PROJECT = "project"  # an existing Diffio project (apiProjectId column)
    FILE = "file"  # a local audio file: create project, upload, generate, download


class Stage(StrEnum):
    """Where a row is. Every write is a compare-and-set on this column."""

    # Imported; nothing the API could charge for has been accepted yet.
    PENDING = "pending"
    # File row: create_project answered; its id is durable (invariant 2) but the
    # upload is not confirmed, so no generation has been posted for it.
    PROJECT = "project"
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
    {Stage.PENDING, Stage.PROJECT, Stage.UPLOADED, Stage.SUBMITTED, Stage.GENERATED}
)

# The legal moves. A same-stage move updates fields (attempts, apiStatus,
# a retryable error) without changing where the row is.
LEGAL_MOVES: Mapping[Stage, frozenset[Stage]] = {
    Stage.PENDING: frozenset({Stage.PENDING, Stage.PROJECT, Stage.SUBMITTED, Stage.FAILED}),
    # PROJECT -> PROJECT also covers "upload URL expired: fresh project".
    Stage.PROJECT: frozenset({Stage.PROJECT, Stage.UPLOADED, Stage.PENDING, Stage.FAILED}),
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
    """The export's `status` (CONTRACT.md): pending, submitted, complete or failed."""
    if stage in (Stage.PENDING, Stage.PROJECT, Stage.UPLOADED):
        return "pending"
    if stage in (Stage.SUBMITTED, Stage.GENERATED):
        return "submitted"
    return stage.value


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

    @property
    def status(self) -> str:
        """The contract's status for this row."""
        return contract_status(self.stage)

    def export_record(self) -> dict[str, Any]:
        """One export record with every field CONTRACT.md names, and more."""
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
    error: Mapping[str, Any] | None
    attempts_delta: int  # added to attempts
    polls_delta: int  # added to polls
    leader_row_id: str | None


# The Update keys that set a column of the same name (the deltas add instead).
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


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Who is running: recorded in the ledger's runs table and in its lock."""

    run_id: str
    pid: int
    host: str
    started_at: float
    command: str = ""


class Ledger(Protocol):
    """What the runner needs from a ledger; implemented per backend.

    All methods are coroutines on the asyncio event loop. Writes resolve only
    once committed (group commit may batch many writers into one transaction).
    """

    description: str

    async def open(self, run: RunInfo, *, lock: bool = True) -> None:
        """Create or migrate the schema, take the run lock, record the run.

        Raises LedgerLocked when another live run holds the ledger.
        With ``lock=False`` (status, export) the ledger is only read.
        """
        ...

    async def close(self, exit_code: int | None = None) -> None:
        """Flush pending writes, record the run's end, release the lock."""
        ...

    async def import_rows(self, rows: Sequence[NewRow]) -> list[LedgerRow]:
        """Insert rows not yet present; return every given row's current state.

        Idempotent: importing the same rows again changes nothing but their
        ``retired`` flag. A row whose ``error`` is set and which is not yet
        active is stored (or refreshed) as FAILED with that error. A row whose
        group already has an earlier row gets ``leader_row_id`` = that row.
        A known row whose idempotency_key or source_sha256 changed is returned
        as stored; the runner decides what to do.
        """
        ...

    async def finish_import(self) -> int:
        """Mark rows not seen since :meth:`open` as retired; return how many."""
        ...

    async def transition(
        self,
        row_id: str,
        expect: Stage | frozenset[Stage],
        to: Stage,
        update: Update | None = None,
        *,
        event: str,
        detail: Mapping[str, Any] | None = None,
        current: LedgerRow | None = None,
    ) -> LedgerRow:
        """Compare-and-set a row from ``expect`` to ``to`` and append an event.

        Raises TransitionConflict when the row is missing or not in
        ``expect``, and LedgerError when ``to`` is not a legal move.

        ``current`` is the caller's copy of the row (the row it is moving).
        With it the ledger does not read the whole row back: it returns
        ``current`` with ``stage``, the update's columns and what the database
        computed (``attempts``, ``polls``, ``updated_at``) replaced. The
        compare-and-set still checks the stored stage, so a stale ``current``
        conflicts exactly as without it; fields that another writer changed
        without changing the stage are not seen. Its ``row_id`` must be
        ``row_id``.
        """
        ...

    async def get(self, row_id: str) -> LedgerRow | None:
        """One row, or None."""
        ...

    def rows(
        self,
        *,
        stages: frozenset[Stage] | None = None,
        include_retired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        """Rows in manifest order (by line), streamed in pages."""
        ...

    async def counts(self, *, include_retired: bool = False) -> dict[Stage, int]:
        """How many rows are in each stage."""
        ...

    async def error_summary(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The most common (code, message, count) among failed rows."""
        ...

    async def events(self, row_id: str) -> list[Event]:
        """A row's history, oldest first."""
        ...

    async def runs(self) -> list[dict[str, Any]]:
        """Every run recorded in this ledger, oldest first."""
        ...


# The event a row's history gets when a worker takes over a lease that its
# previous owner let expire (detail: previousOwner, leaseExpiredAt, owner).
LEASE_TAKEN_OVER = "leaseTakenOver"


class LeasingLedger(Ledger, Protocol):
    """A ledger several runners can share: work is leased, workers heartbeat.

    A lease says which worker is working on a row and until when; heartbeats
    renew it. When a worker dies its leases run out and any other worker's
    :meth:`lease` takes those rows over. Leasing never changes a row's stage
    and never bypasses the compare-and-set of :meth:`Ledger.transition`:
    two workers that both believe they hold a row still cannot both move it.
    Time comes from the ledger's clock; ``ttl`` is in seconds.

    On PostgreSQL this is how hosts share a job. SQLite and memory ledgers
    implement the same semantics, so the runner has one code path.
    """

    async def register_worker(self, worker_id: str, run: RunInfo, ttl: float) -> None:
        """Record a live worker (host and pid from ``run``) with a first heartbeat.

        Registering an id again refreshes it and keeps its leases.
        """
        ...

    async def heartbeat(self, worker_id: str, ttl: float) -> int:
        """Renew the worker and every lease it holds until now + ``ttl``.

        Returns how many workers are live (their last heartbeat is younger
        than the ttl they declared), this one included: the runner divides
        the job's ``--rate`` by it. Raises LedgerError for an unknown worker.
        """
        ...

    async def lease(self, worker_id: str, limit: int, ttl: float) -> list[LedgerRow]:
        """Lease up to ``limit`` rows to the worker until now + ``ttl``.

        Candidates are rows in ACTIVE_STAGES, not retired, not followers
        (``leader_row_id`` is None), and unleased or with an expired lease;
        they are taken in manifest order. Concurrent callers never get the
        same row. A row taken from another worker whose lease expired gets a
        :data:`LEASE_TAKEN_OVER` event naming that worker.
        """
        ...

    async def release(self, worker_id: str, row_ids: Sequence[str]) -> None:
        """Give back the worker's leases on ``row_ids`` (others' are left alone)."""
        ...

    async def deregister_worker(self, worker_id: str) -> None:
        """Release every lease of the worker and forget it (unknown ids: no-op)."""
        ...

    async def live_workers(self) -> list[dict[str, Any]]:
        """Live workers, oldest first: worker_id, host, pid, run_id,
        started_at, heartbeat_at, ttl and ``leases`` (unexpired leases held)."""
        ...

    async def pending_work(self) -> tuple[int, int]:
        """(rows :meth:`lease` could hand out now, rows under an unexpired lease).

        Both count the candidates of :meth:`lease` only. (0, n>0): nothing
        left for a new worker but others are still busy; (0, 0): the job is
        done as far as leasing goes.
        """
        ...

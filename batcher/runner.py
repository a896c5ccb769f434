"""The pipeline: plan → submit → poll → download, every step in the ledger.

Shape: one anyio task group; the planner feeds a bounded stream
to N submit workers; one Poller holds submitted generations; download workers
fetch finished file rows. Every API call passes the client's one rate gate and
one concurrency cap. The invariants this module keeps:

* a row is posted only with its ledger key, and only after its project id
  (file rows) is committed: a re-post after any crash is a free replay;
* a row leaves the ``pending`` family only through a committed transition, so
  a halted or killed run resumes exactly where the ledger says;
* a download failure never leads to a new generation (GENERATED only moves on
  to COMPLETE or FAILED).
"""

from __future__ import annotations

import functools
import logging
import mimetypes
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
from anyio import CancelScope
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .client import DiffioClient, SubmissionsStopped, UrlExpired
from .clock import Clock, SystemClock
from .errors import (
    ApiError,
    BatcherError,
    ClientError,
    Conflict,
    LedgerError,
    OutputPathError,
    RunHalted,
    SpendLimit,
    TransitionConflict,
    TransportError,
)
from .keys import FileSource, ProjectSource, derive_key, sha256_file
from .ledger.base import LeasingLedger, Ledger, is_shared
from .model import ACTIVE_STAGES, Kind, LedgerRow, NewRow, RunInfo, Stage, Update, contract_status
from .paths import default_output_rel, resolve_output, write_atomically_target
from .planner import PlanContext, plan_batches
from .poller import DelayModel, Poller, PollItem
from .ratelimit import RateGate
from .retry import RetryPolicy
from .runstats import RunStats
from .settings import Settings
from .spend import SpendCap

__all__ = ["RunResult", "Runner"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# API statuses that mean "not finished yet" (the API answers queued or
# pending for a generation not started yet).
RUNNING_STATUSES = frozenset({"queued", "pending", "processing", "running", "uploading"})
DONE_STATUSES = frozenset({"complete", "completed", "succeeded"})
FAILED_STATUSES = frozenset({"failed", "error", "cancelled", "canceled"})
# After this many polls answering a status we do not know, the row fails
# instead of being polled forever.
UNKNOWN_STATUS_LIMIT = 10
FRESH_PROJECT_LIMIT = 3
# Several hosts on one PostgreSQL ledger: a lease lasts --lease-ttl seconds and
# is renewed by a heartbeat every HEARTBEAT_EVERY; a new worker waits a little
# over one heartbeat before its first request, so the others have lowered
# their share of --rate first and the sum never passes it.
HEARTBEAT_EVERY = 1.0
LEASE_IDLE = 0.5
LEASE_HOLD_SECONDS = 4.0
# --halt-after judges the failure share only after this many finished rows.
HALT_AFTER_MIN_SAMPLE = 20
DOWNLOAD_URL_LIMIT = 5


@dataclass(slots=True)
class RunResult:
    """What ``batcher run`` reports when it ends."""

    exit_code: int
    counts: dict[str, int]
    stats: RunStats
    halted: str | None = None
    halt_error: BatcherError | None = None
    ledger: str = ""
    errors: list[tuple[str, str, int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Plain values (the Python API and --report)."""
        return {
            "exitCode": self.exit_code,
            "counts": dict(self.counts),
            "halted": self.halted,
            "ledger": self.ledger,
            "topErrors": [
                {"code": c, "message": m, "count": n} for c, m, n in self.errors
            ],
            **self.stats.snapshot(),
        }


class _Halt(Exception):
    """Internal: stop the whole run now (401/403 on the key, 405)."""


class Runner:
    """Runs one job over one ledger with one client. See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        client: DiffioClient,
        *,
        gate: RateGate,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        policy: RetryPolicy | None = None,
        stats: RunStats | None = None,
        wall: Callable[[], float] = time.time,
        run_info: RunInfo | None = None,
    ) -> None:
        self.settings = settings
        self._run_info = run_info or RunInfo(
            run_id=uuid.uuid4().hex, pid=os.getpid(), host=socket.gethostname(),
            started_at=time.time())
        self.ledger = ledger
        self.client = client
        self.gate = gate
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.policy = policy or RetryPolicy(max_attempts=settings.max_attempts)
        self.stats = stats or RunStats()
        self._wall = wall
        self._attempts: dict[str, int] = {}
        self._polls: dict[str, int] = {}
        self._halt_error: BatcherError | None = None
        self.spend: SpendCap | None = None
        if settings.price_per_minute is not None:
            self.spend = SpendCap(settings.price_per_minute, settings.max_spend)
        self._hard_halt = False
        self._scope: CancelScope | None = None
        self._dl_send: MemoryObjectSendStream[LedgerRow] | None = None
        self._manifest_dir = settings.manifest.parent
        # A shared (PostgreSQL) ledger may have other hosts on the same job:
        # work is leased there. A SQLite ledger is locked to this run.
        self._hosts: LeasingLedger | None = ledger if is_shared(ledger) else None
        self._shared = self._hosts is not None
        self._worker_id = f"w-{uuid.uuid4().hex[:16]}"
        self._leased: set[str] = set()
        self.poller = Poller(
            self._check,
            DelayModel(settings.poll_interval, rng=self.rng),
            now=self.clock.now,
            workers=max(2, settings.concurrency),
        )

    # ------------------------------------------------------------------ run

    async def run(self) -> RunResult:
        """Run the job to its end (or a halt) and return the result."""
        ctx = PlanContext(
            manifest=self.settings.manifest,
            model=self.settings.model,
            namespace=self.settings.key_namespace,
            out=self.settings.out,
        )
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self.spend is not None and self.spend.cap is not None:
                    await self._count_earlier_spend(self.spend)
                if self._shared:
                    await self._join()
                await self._pipeline(ctx)
        finally:
            if self._shared:
                with anyio.CancelScope(shield=True):
                    await self._leave()
        if not self._hard_halt:
            await self._settle_followers()
        return await self._result()

    async def _join(self) -> None:
        """Register as a worker of the shared job and take a share of --rate."""
        ttl = self.settings.lease_ttl
        hosts = self._shared_ledger()
        await hosts.register_worker(self._worker_id, self._run_info, ttl)
        live = await hosts.heartbeat(self._worker_id, ttl)
        self.gate.set_rate(self.settings.rate / max(1, live))
        # Let the others see us and lower their share before we send anything.
        await anyio.sleep(HEARTBEAT_EVERY * 1.5)
        live = await hosts.heartbeat(self._worker_id, self.settings.lease_ttl)
        self.gate.set_rate(self.settings.rate / max(1, live))
        log.info("worker.joined %s (%d live workers)", self._worker_id, live)

    def _shared_ledger(self) -> LeasingLedger:
        assert self._hosts is not None, "only a shared ledger has other hosts"
        return self._hosts

    async def _leave(self) -> None:
        try:
            await self._shared_ledger().deregister_worker(self._worker_id)
        except LedgerError as err:
            log.warning("worker.leave_failed %s", err)

    async def _pipeline(self, ctx: PlanContext) -> None:
        if not self._shared:
            await self._stages(ctx)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat)
            await self._stages(ctx)
            tg.cancel_scope.cancel()  # everything finished; stop the heartbeat

    async def _stages(self, ctx: PlanContext) -> None:
        n = self.settings.concurrency
        async with anyio.create_task_group() as downloads:
            dl_send, dl_recv = anyio.create_memory_object_stream[LedgerRow](n * 4)
            self._dl_send = dl_send
            for _ in range(min(n, 8)):
                downloads.start_soon(self._download_worker, dl_recv.clone())
            dl_recv.close()
            async with dl_send, anyio.create_task_group() as polling:
                polling.start_soon(self.poller.run)
                sub_send, sub_recv = anyio.create_memory_object_stream[LedgerRow](n * 2)
                async with anyio.create_task_group() as submits:
                    for _ in range(n):
                        submits.start_soon(self._submit_worker, sub_recv.clone())
                    sub_recv.close()
                    async with sub_send:
                        await self._plan(ctx, sub_send)
                self.poller.close()

    async def _count_earlier_spend(self, spend: SpendCap) -> None:
        """The cap covers the job: count what earlier runs already submitted."""
        stages = frozenset({Stage.SUBMITTED, Stage.GENERATED, Stage.COMPLETE, Stage.FAILED})
        async for row in self.ledger.rows(stages=stages):
            if row.generation_id and row.leader_row_id is None:
                await anyio.to_thread.run_sync(spend.add_earlier, row)

    async def _reserve(self, row: LedgerRow) -> bool:
        """Reserve the submission's estimated cost; False (and halt) past the cap."""
        if self.spend is None:
            return True
        usd = await anyio.to_thread.run_sync(self.spend.estimate, row)
        if self.spend.try_reserve(row.row_id, usd):
            return True
        self._set_halt(RunHalted(
            f"--max-spend reached: the next submission (${usd:,.2f}) would pass the cap; "
            f"{self.spend.figures()}. Re-run with a higher --max-spend to go on.",
            code="maxSpendReached"), hard=False)
        return False

    def _settle_spend(self, row_id: str, *, charged: bool) -> None:
        if self.spend is not None:
            self.stats.estimated_spend += self.spend.settle(row_id, charged=charged)

    def _check_failure_share(self) -> None:
        """--halt-after PCT: stop submitting when too many rows fail."""
        limit = self.settings.halt_after
        finished = self.stats.done + self.stats.failed
        if limit is None or finished < HALT_AFTER_MIN_SAMPLE or self._halt_error is not None:
            return
        share = 100.0 * self.stats.failed / finished
        if share > limit:
            self._set_halt(RunHalted(
                f"--halt-after {limit:g}: {self.stats.failed} of {finished} finished rows "
                f"failed ({share:.1f}%)", code="haltAfter"), hard=False)

    async def _result(self) -> RunResult:
        by_stage = await self.ledger.counts()
        counts: dict[str, int] = {"pending": 0, "submitted": 0, "complete": 0, "failed": 0}
        for stage, n in by_stage.items():
            counts[contract_status(stage)] += n
        errors = await self.ledger.error_summary(5)
        if self._halt_error is not None:
            code = 3
        elif counts["failed"] or counts["pending"] or counts["submitted"]:
            code = 1
        else:
            code = 0
        return RunResult(
            exit_code=code,
            counts=counts,
            stats=self.stats,
            halted=self.stats.halted,
            halt_error=self._halt_error,
            ledger=self.ledger.description,
            errors=errors,
        )

    # -------------------------------------------------------------- planning

    async def _plan(self, ctx: PlanContext, submit: MemoryObjectSendStream[LedgerRow]) -> None:
        """Import the manifest; on a private ledger, send each row's work at once."""
        async for batch in plan_batches(ctx):
            self.stats.rows_total += len(batch)
            current = await self.ledger.import_rows(batch)
            for new, row in zip(batch, current, strict=True):
                if self._hard_halt:
                    return
                prepared = await self._prepare(new, row)
                if prepared is not None and not self._shared:
                    await self._send_work(prepared, submit)
        retired = await self.ledger.finish_import()
        if retired:
            log.info("ledger.retired", extra={"rows": retired})
        if self._shared:
            await self._lease_loop(submit)

    async def _prepare(self, new: NewRow, row: LedgerRow) -> LedgerRow | None:
        """What the manifest row says about the ledger row, before any request.

        Returns the row when it has work to do, None when not (invalid,
        complete, failed, a follower). On a shared ledger another host may
        have prepared the same row first: its compare-and-set wins.
        """
        try:
            return await self._prepare_row(new, row)
        except TransitionConflict:
            if not self._shared:
                raise
            log.info("row.prepared_elsewhere", extra={"row": row.row_id})
            return None

    async def _prepare_row(self, new: NewRow, row: LedgerRow) -> LedgerRow | None:
        if new.error is not None:
            self.stats.rows_invalid += 1
            log.warning("row.invalid %s", new.error.get("message"), extra={"row": new.row_id})
            return None
        if row.kind is Kind.FILE and row.source_sha256 != new.source_sha256:
            row = await self._source_changed(new, row)
        if row.leader_row_id is not None:
            await self._check_follower(new, row)
            return None
        if row.stage is Stage.FAILED:
            if not self.settings.retry_failed:
                return None
            retried = await self._prepare_retry(row)
            if retried is None:
                return None
            row = retried
        if row.stage is Stage.COMPLETE:
            if row.kind is Kind.FILE and not await self._output_intact(row):
                log.warning("output.missing: downloading again", extra={"row": row.row_id})
                return await self._move(row, Stage.GENERATED, {}, "outputMissing")
            self.stats.rows_skipped += 1
            return None
        return row

    async def _send_work(self, row: LedgerRow, submit: MemoryObjectSendStream[LedgerRow]
                         ) -> None:
        """Hand an active row to the stage that goes on with it."""
        if row.stage in (Stage.PENDING, Stage.PROJECT_CREATED, Stage.UPLOADED):
            if self._halt_error is not None:
                self._leased.discard(row.row_id)
                return
            self.stats.in_flight += 1
            await _put(submit, row)
        elif row.stage is Stage.SUBMITTED:
            self.stats.in_flight += 1
            self._poll(row, resumed=True)
        elif row.stage is Stage.GENERATED:
            self.stats.in_flight += 1
            await self._send_download(row)
        else:
            self._leased.discard(row.row_id)

    # ------------------------------------------------- several hosts, one job

    async def _lease_loop(self, submit: MemoryObjectSendStream[LedgerRow]) -> None:
        """Shared ledger: work only on leased rows, until no host has any left.

        Rows are leased in batches; the heartbeat renews the leases. A dead
        host's rows come back once its leases expire: ones with a generation
        id are polled, the others posted again with their key (a replay).
        """
        ledger = self._shared_ledger()
        while not self._hard_halt:
            # Hold what this host can work through in a few seconds at its
            # share of the rate: enough to keep busy, not so much that it
            # starves the other hosts or leaves much to take over if it dies.
            hold = max(2 * self.settings.concurrency, int(self.gate.rate * LEASE_HOLD_SECONDS))
            if self._halt_error is None and len(self._leased) < hold:
                rows = await ledger.lease(self._worker_id, hold - len(self._leased),
                                          self.settings.lease_ttl)
                for row in rows:
                    self._leased.add(row.row_id)
                    await self._send_work(row, submit)
                if rows:
                    continue
            if not self._leased:
                if self._halt_error is not None:
                    return
                free, held = await ledger.pending_work()
                if free == 0 and held == 0:
                    return
            await anyio.sleep(LEASE_IDLE)

    async def _heartbeat(self) -> None:
        """Renew this worker's leases; take its share of the job's --rate."""
        while True:
            try:
                live = await self._shared_ledger().heartbeat(self._worker_id,
                                                             self.settings.lease_ttl)
                share = self.settings.rate / max(1, live)
                if abs(share - self.gate.rate) > 1e-9:
                    log.info("rate.share %.2f req/s (%d live workers)", share, live)
                    self.gate.set_rate(share)
            except LedgerError as err:
                log.warning("heartbeat.failed %s", err)
            await anyio.sleep(HEARTBEAT_EVERY)

    def _drop(self, row_id: str) -> None:
        """A row this run stops working on without finishing it (a halt)."""
        self.stats.in_flight -= 1
        self._leased.discard(row_id)

    async def _output_intact(self, row: LedgerRow) -> bool:
        path = row.output_path
        if not path or row.output_sha256 is None:
            return False
        try:
            sha, size = await anyio.to_thread.run_sync(sha256_file, Path(path))
        except OSError:
            return False
        return sha == row.output_sha256 and (row.output_size is None or size == row.output_size)

    async def _source_changed(self, new: NewRow, row: LedgerRow) -> LedgerRow:
        """A file edited since its row was keyed: report it, restore the new audio.

        Nothing of the old request is reused: a fresh key (from the new bytes)
        and a fresh project, so the old generation can never be downloaded for
        the new audio. The old key, project and generation stay in the row's
        history (event ``sourceChanged``).
        """
        self.stats.source_changed += 1
        detail = {"oldSha256": row.source_sha256, "newSha256": new.source_sha256,
                  "oldKey": row.idempotency_key, "oldProjectId": row.api_project_id,
                  "oldGenerationId": row.generation_id, "oldStage": row.stage.value}
        in_flight = row.stage in (Stage.UPLOADED, Stage.SUBMITTED, Stage.GENERATED)
        log.warning(
            "source.changed: %s changed on disk since its row was keyed (%s -> %s)%s; "
            "restoring the new audio as a new request",
            new.source_path, (row.source_sha256 or "")[:12], (new.source_sha256 or "")[:12],
            f"; generation {row.generation_id or '(maybe posted)'} of the old audio is "
            "abandoned" if in_flight else "",
            extra={"row": row.row_id},
        )
        reset: Update = {
            "idempotency_key": new.idempotency_key, "base_key": None, "retry_count": 0,
            "source_sha256": new.source_sha256, "source_size": new.source_size,
            "api_project_id": None, "generation_id": None, "api_status": None,
            "upload_url": None, "upload_method": None, "upload_expires_at": None,
            "output_path": None, "output_sha256": None, "output_size": None, "error": None,
        }
        return await self._move(row, Stage.PENDING, reset, "sourceChanged", detail)

    async def _check_follower(self, new: NewRow, row: LedgerRow) -> None:
        """A row that repeats an earlier row's request waits for that row."""
        if row.stage is not Stage.PENDING or row.leader_row_id is None:
            return
        leader = await self.ledger.get(row.leader_row_id)
        if leader is not None and leader.request_digest != new.request_digest:
            error = {
                "code": "idempotencyKeyReused",
                "message": f"idempotencyKey {new.idempotency_key!r} is already used by row "
                           f"{leader.row_id} (line {leader.line}) with another request on the "
                           "same project; the API would silently replay that one",
                "httpStatus": None,
            }
            await self._move(row, Stage.FAILED, {"error": error}, "idempotencyKeyReused")
            self.stats.failed += 1

    async def _prepare_retry(self, row: LedgerRow) -> LedgerRow | None:
        """--retry-failed: move a failed row back to where its work resumes."""
        error = dict(row.error or {})
        code = error.get("code")
        if code == "invalidRow":
            return None
        if row.api_status in FAILED_STATUSES and row.generation_id:
            # The generation failed at the API and replays as failed forever:
            # a deliberate new charge under a key derived from the old request
            # and a counter kept here, so a crash mid-retry replays, not re-pays.
            retry = row.retry_count + 1
            source: ProjectSource | FileSource
            if row.kind is Kind.FILE:
                source = FileSource(row.source_sha256 or "")
            else:
                source = ProjectSource(row.api_project_id or "")
            key = derive_key(model=row.model_key, source=source, sampling=row.sampling,
                             params=row.params, namespace=self.settings.key_namespace,
                             retry=retry)
            if row.explicit_key and row.idempotency_key:
                key = f"{(row.base_key or row.idempotency_key)[:240]}~retry{retry}"
            update: Update = {
                "idempotency_key": key, "base_key": row.base_key or row.idempotency_key,
                "retry_count": retry, "generation_id": None, "api_status": None,
                "error": None,
            }
            to = Stage.UPLOADED if row.kind is Kind.FILE and row.api_project_id else Stage.PENDING
            return await self._move(row, to, update, "retryFailedGeneration",
                                    {"oldKey": row.idempotency_key, "retry": retry})
        if row.generation_id:
            to = Stage.SUBMITTED
            if row.api_status in DONE_STATUSES and row.kind is Kind.FILE:
                to = Stage.GENERATED
        elif row.kind is Kind.FILE and row.api_project_id and row.upload_url is None:
            to = Stage.UPLOADED
        else:
            to = Stage.PENDING
        update = {"error": None}
        if to is Stage.PENDING and row.kind is Kind.FILE:
            update.update({"api_project_id": None, "upload_url": None})
        return await self._move(row, to, update, "retryFailed", {"oldError": error})

    # ---------------------------------------------------------- submissions

    async def _submit_worker(self, recv: MemoryObjectReceiveStream[LedgerRow]) -> None:
        async with recv:
            async for row in recv:
                if self._halt_error is not None:
                    self._drop(row.row_id)
                    continue
                try:
                    await self._submit(row)
                except _Halt:
                    self._cancel()
                    return

    async def _submit(self, row: LedgerRow) -> None:
        try:
            if row.kind is Kind.FILE:
                uploaded = await self._ensure_uploaded(row)
                if uploaded is None:
                    return
                row = uploaded
            if self._halt_error is not None:
                self._drop(row.row_id)
                return
            assert row.api_project_id is not None and row.idempotency_key is not None
            if not await self._reserve(row):
                self._drop(row.row_id)
                return
            project, key = row.api_project_id, row.idempotency_key
            try:
                accepted = await self._call(row.row_id, lambda: self.client.create_generation(
                    model=row.model_key, api_project_id=project, sampling=row.sampling,
                    params=row.params, idempotency_key=key))
            except ApiError as err:
                # No answer at all: the API may have charged; count it, to be safe.
                self._settle_spend(row.row_id, charged=isinstance(err, TransportError))
                raise
            # A replay counts too: rows whose generation is already in the
            # ledger are polled, never posted, so a replay answers a post whose
            # answer was lost (in this run or a killed one) and was charged.
            self._settle_spend(row.row_id, charged=True)
        except SubmissionsStopped:
            # Never sent: the row stays where it is, for the next run.
            self._settle_spend(row.row_id, charged=False)
            self._drop(row.row_id)
            return
        except ApiError as err:
            await self._api_failure(row, err)
            return
        except OutputPathError as err:
            await self._fail(row, {"code": err.code, "message": str(err), "httpStatus": None})
            return
        self.stats.submitted += 1
        if accepted.replay:
            self.stats.replays += 1
        row = await self._move(row, Stage.SUBMITTED, {
            "generation_id": accepted.generation_id,
            "api_project_id": accepted.api_project_id or row.api_project_id,
            "api_status": accepted.status,
            # A 402/401 recorded by a halted run is history once accepted.
            "error": None,
        }, "replayed" if accepted.replay else "submitted",
            {"generationId": accepted.generation_id, "replay": accepted.replay})
        await self._after_status(row, accepted.status, None, None, poll=None)

    async def _ensure_uploaded(self, row: LedgerRow) -> LedgerRow | None:
        """Create the project (durably) and upload the file; None when failed."""
        assert row.source_path is not None
        path = Path(row.source_path)
        fresh = 0
        while True:
            if row.stage is Stage.PENDING or (
                row.stage is Stage.PROJECT_CREATED and self._upload_expired(row)
            ):
                if fresh >= FRESH_PROJECT_LIMIT:
                    await self._fail(row, {"code": "uploadExpired", "httpStatus": None,
                                           "message": "upload URL expired on "
                                           f"{FRESH_PROJECT_LIMIT} fresh projects"})
                    return None
                fresh += 1
                row = await self._create_project(row, path)
            if row.stage is not Stage.PROJECT_CREATED:
                return row
            assert row.upload_url is not None
            url, method = row.upload_url, row.upload_method or "PUT"
            ctype = row.content_type or "application/octet-stream"
            size = row.source_size or 0
            try:
                await self._call(row.row_id, functools.partial(
                    self.client.upload, url=url, method=method, path=path,
                    content_type=ctype, size=size))
            except UrlExpired:
                # No generation exists on this project (we only post after
                # UPLOADED is committed), so a fresh project costs nothing.
                log.info("upload.expired: fresh project", extra={"row": row.row_id})
                row = await self._move(row, Stage.PROJECT_CREATED, {"upload_expires_at": "expired"},
                                       "uploadExpired")
                continue
            return await self._move(row, Stage.UPLOADED, {"upload_url": None}, "uploaded")

    async def _create_project(self, row: LedgerRow, path: Path) -> LedgerRow:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        size = row.source_size
        if size is None:
            size = (await anyio.Path(path).stat()).st_size
        created = await self._call(row.row_id, lambda: self.client.create_project(
            file_name=path.name, content_type=ctype, content_length=size))
        # Invariant 2: the project id is durable before anything else happens.
        return await self._move(row, Stage.PROJECT_CREATED, {
            "api_project_id": created.api_project_id,
            "upload_url": created.upload_url,
            "upload_method": created.upload_method,
            "upload_expires_at": created.expires_at,
            "content_type": ctype,
        }, "projectCreated", {"apiProjectId": created.api_project_id})

    def _upload_expired(self, row: LedgerRow) -> bool:
        if row.upload_url is None:
            return True
        stamp = row.upload_expires_at
        if not stamp:
            return False
        if stamp == "expired":
            return True
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return False
        # A margin so an upload does not start on a URL about to lapse.
        return when <= self._wall() + 30

    # --------------------------------------------------------------- polling

    def _poll(self, row: LedgerRow, *, resumed: bool) -> None:
        assert row.generation_id is not None
        item = PollItem(row.row_id, row.generation_id, row.api_project_id,
                        submitted_at=self.clock.now(), resumed=resumed, row=row)
        item.extra["status"] = row.api_status
        item.extra["kind"] = row.kind.value
        self.poller.add(item, due_in=0.0 if resumed else None)

    async def _check(self, item: PollItem) -> bool:
        self.stats.polls += 1
        self._polls[item.row_id] = self._polls.get(item.row_id, 0) + 1
        self._attempts[item.row_id] = self._attempts.get(item.row_id, 0) + 1
        try:
            progress = await self.client.get_progress(
                generation_id=item.generation_id, api_project_id=item.api_project_id)
        except ApiError as err:
            return await self._poll_failure(item, err)
        assert item.row is not None
        try:
            return await self._after_status(item.row, progress.status, progress.error,
                                            progress.error_details, poll=item)
        except TransitionConflict:
            # Another host (or a follower settle) moved the row on: not ours now.
            log.info("poll.row_moved_elsewhere", extra={"row": item.row_id})
            return True

    async def _poll_failure(self, item: PollItem, err: ApiError) -> bool:
        if err.halts and not isinstance(err, SpendLimit):
            self._set_halt(err, hard=True)
            self._cancel()
            return True
        item.errors += 1
        if err.retryable and item.errors < self.settings.max_attempts * 2:
            log.info("poll.retry %s", err, extra={"row": item.row_id})
            return False
        row = await self.ledger.get(item.row_id)
        if row is not None and row.stage is Stage.SUBMITTED:
            await self._fail(row, err.to_record())
        return True

    async def _after_status(
        self,
        row: LedgerRow,
        status: str,
        error: str | None,
        details: str | None,
        *,
        poll: PollItem | None,
    ) -> bool:
        """Act on an API status; True when the row needs no more polling."""
        status_l = (status or "").lower()
        if status_l in DONE_STATUSES:
            # Only a generation seen unfinished before says how long one takes:
            # one done at its first poll only bounds it by the wait we chose
            # (plus queueing), and learning that bound ratchets the wait up.
            if poll is not None and not poll.resumed and poll.polls > 1:
                self.poller.delays.observe(self.clock.now() - poll.submitted_at)
            if row.kind is Kind.FILE:
                row = await self._move(row, Stage.GENERATED, {"api_status": status}, "generated")
                await self._send_download(row)
            else:
                await self._move(row, Stage.COMPLETE, {"api_status": status}, "complete")
                self.stats.done += 1
                self.stats.in_flight -= 1
            return True
        if status_l in FAILED_STATUSES:
            message = error or details or "the generation failed at the API"
            if details and error and details != error:
                message = f"{error}: {details}"
            await self._fail(row, {"code": "generationFailed", "message": message,
                                   "httpStatus": None}, api_status=status)
            return True
        if status_l not in RUNNING_STATUSES:
            count = 1 if poll is None else poll.unknown_statuses + 1
            if poll is not None:
                poll.unknown_statuses = count
            log.warning("poll.unknown_status %r", status, extra={"row": row.row_id})
            if count >= UNKNOWN_STATUS_LIMIT:
                await self._fail(row, {"code": "unknownStatus", "httpStatus": None,
                                       "message": f"the API kept answering status {status!r}, "
                                       "which batcher does not know"}, api_status=status)
                return True
        if poll is None:
            self._poll(row, resumed=False)
            return True
        if status != poll.extra.get("status"):
            poll.extra["status"] = status
            poll.row = await self._move(row, Stage.SUBMITTED, {"api_status": status}, "progress")
        return False

    # ------------------------------------------------------------- downloads

    async def _send_download(self, row: LedgerRow) -> None:
        assert self._dl_send is not None
        await _put(self._dl_send, row)

    async def _download_worker(self, recv: MemoryObjectReceiveStream[LedgerRow]) -> None:
        async with recv:
            async for row in recv:
                try:
                    await self._download(row)
                except _Halt:
                    self._cancel()
                    return

    async def _download(self, row: LedgerRow) -> None:
        assert row.generation_id is not None and row.api_project_id is not None
        rel = row.output_rel
        final: Path | None = None
        try:
            if rel:
                final = resolve_output(self.settings.out, rel)
        except OutputPathError as err:
            await self._fail(row, {"code": err.code, "message": str(err), "httpStatus": None})
            return
        attempt = 0
        while True:
            attempt += 1
            self._attempts[row.row_id] = self._attempts.get(row.row_id, 0) + 1
            try:
                info = await self.client.get_download(
                    generation_id=row.generation_id, api_project_id=row.api_project_id)
                # Resolved again on every attempt: a symlink planted since the
                # last check must not lead the write outside --out.
                final = resolve_output(self.settings.out, rel or default_output_rel(
                    self._source_rel(row), info.mime_type))
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = write_atomically_target(final, row.row_id)
                try:
                    sha, size = await self.client.download(url=info.download_url, dest=tmp)
                    await anyio.to_thread.run_sync(_publish, tmp, final)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            except OutputPathError as err:
                await self._fail(row, {"code": err.code, "message": str(err), "httpStatus": None})
                return
            except ApiError as err:
                wait = self._download_wait(err, attempt)
                if wait is None:
                    if err.halts and not isinstance(err, SpendLimit):
                        self._set_halt(err, hard=True)
                        raise _Halt() from err
                    await self._fail(row, err.to_record())
                    return
                log.info("download.retry %s", err, extra={"row": row.row_id})
                await self.clock.sleep(wait)
                continue
            except OSError as err:
                await self._fail(row, {"code": "outputWriteFailed", "httpStatus": None,
                                       "message": f"cannot write {final}: {err}"})
                return
            await self._move(row, Stage.COMPLETE, {
                "output_path": str(final), "output_sha256": sha, "output_size": size,
            }, "downloaded", {"output": str(final), "sha256": sha, "size": size})
            self.stats.done += 1
            self.stats.in_flight -= 1
            return

    def _download_wait(self, err: ApiError, attempt: int) -> float | None:
        if isinstance(err, UrlExpired) and attempt < DOWNLOAD_URL_LIMIT:
            return 0.0
        # Before the audio is ready the API may answer 404 or 409: retry later.
        not_ready = isinstance(err, Conflict) or (
            isinstance(err, ClientError) and err.status == 404)
        if not_ready and attempt < self.settings.max_attempts * 2:
            return min(30.0, self.settings.poll_interval * attempt + 0.5)
        return self.policy.decide(err, attempt, self.rng)

    def _source_rel(self, row: LedgerRow) -> str:
        assert row.source_path is not None
        rel = os.path.relpath(row.source_path, self._manifest_dir)
        return rel.replace(os.sep, "/")

    # -------------------------------------------------------------- followers

    async def _settle_followers(self) -> None:
        """Rows that repeat an earlier row's request take its outcome."""
        followers = [r async for r in self.ledger.rows(stages=ACTIVE_STAGES)
                     if r.leader_row_id is not None]
        for row in followers:
            leader = await self.ledger.get(row.leader_row_id or "")
            if leader is None:
                continue
            try:
                await self._settle(row, leader)
            except TransitionConflict:
                if not self._shared:
                    raise
                log.info("row.settled_elsewhere", extra={"row": row.row_id})
            except (OSError, OutputPathError) as err:
                await self._fail(row, {"code": "outputWriteFailed", "httpStatus": None,
                                       "message": str(err)})

    async def _settle(self, row: LedgerRow, leader: LedgerRow) -> None:
        note = {"leader": leader.row_id}
        if leader.stage is Stage.FAILED:
            error = dict(leader.error or {})
            error["message"] = (f"{error.get('message', '')} (same request as row "
                                f"{leader.row_id}, line {leader.line})").strip()
            await self._move(row, Stage.FAILED, {"error": error,
                                                 "api_status": leader.api_status},
                             "followerFailed", note)
            return
        if leader.stage is not Stage.COMPLETE:
            return
        if row.stage is Stage.PENDING:
            row = await self._move(row, Stage.SUBMITTED, {
                "generation_id": leader.generation_id, "api_project_id": leader.api_project_id,
                "api_status": leader.api_status}, "followedLeader", note)
        if row.kind is not Kind.FILE:
            await self._move(row, Stage.COMPLETE, {"api_status": leader.api_status},
                             "complete", note)
            return
        if row.stage is Stage.SUBMITTED:
            row = await self._move(row, Stage.GENERATED, {"api_status": leader.api_status},
                                   "generated", note)
        assert leader.output_path is not None
        rel = row.output_rel or default_output_rel(
            self._source_rel(row), mimetypes.guess_type(leader.output_path)[0])
        final = resolve_output(self.settings.out, rel)
        if final != Path(leader.output_path):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = write_atomically_target(final, row.row_id)
            await anyio.to_thread.run_sync(_copy_publish, Path(leader.output_path), tmp, final)
        await self._move(row, Stage.COMPLETE, {
            "output_path": str(final), "output_sha256": leader.output_sha256,
            "output_size": leader.output_size}, "copiedFromLeader", note)

    # ------------------------------------------------------------ machinery

    async def _call(self, row_id: str, fn: Callable[[], Awaitable[T]]) -> T:
        """One API operation with the retry policy; counts attempts per row."""
        attempt = 0
        while True:
            attempt += 1
            self._attempts[row_id] = self._attempts.get(row_id, 0) + 1
            try:
                return await fn()
            except ApiError as err:
                err.row_id = err.row_id or row_id
                # (A 429 has already slowed the shared gate inside the client.)
                if isinstance(err, UrlExpired):
                    raise
                wait = self.policy.decide(err, attempt, self.rng)
                if wait is None:
                    raise
                log.info("request.retry attempt=%d wait=%.2fs %s", attempt, wait, err,
                         extra={"row": row_id})
                self.stats.errors[f"retried:{err.code}"] += 1
                await self.clock.sleep(wait)

    async def _api_failure(self, row: LedgerRow, err: ApiError) -> None:
        if err.halts:
            hard = not isinstance(err, SpendLimit)
            self._set_halt(err, hard=hard)
            # The row keeps its stage (resumable); the error is recorded.
            current = await self.ledger.get(row.row_id)
            if current is not None and current.stage in ACTIVE_STAGES:
                await self._move(current, current.stage, {"error": err.to_record()}, "halted")
            self._drop(row.row_id)
            if hard:
                raise _Halt() from err
            return
        current = await self.ledger.get(row.row_id)
        await self._fail(current or row, err.to_record())

    def _set_halt(self, err: BatcherError, *, hard: bool) -> None:
        if self._halt_error is None:
            self._halt_error = err
            self.stats.halted = f"{getattr(err, 'code', 'halted')}: {err}"
            log.error("run.halted %s", err)
        self._hard_halt = self._hard_halt or hard
        # Posts already waiting for the rate gate give up instead of meeting
        # the same refusal one by one (and delaying the polls behind them).
        # Not on --max-spend: those posts reserved their cost within the cap.
        if getattr(err, "code", None) != "maxSpendReached":
            self.client.stop_generations()

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _fail(self, row: LedgerRow, error: Mapping[str, Any], *,
                    api_status: str | None = None) -> None:
        update: Update = {"error": error}
        if api_status is not None:
            update["api_status"] = api_status
        current = row
        if row.stage is Stage.FAILED:
            return
        try:
            await self._move(current, Stage.FAILED, update, "failed",
                             {"code": error.get("code")})
        except TransitionConflict:
            fresh = await self.ledger.get(row.row_id)
            if fresh is None or fresh.stage is Stage.FAILED:
                return
            await self._move(fresh, Stage.FAILED, update, "failed", {"code": error.get("code")})
        self.stats.failed += 1
        self.stats.in_flight -= 1
        self.stats.errors[str(error.get("code"))] += 1
        self._check_failure_share()
        log.warning("row.failed %s: %s", error.get("code"), error.get("message"),
                    extra={"row": row.row_id})

    async def _move(
        self,
        row: LedgerRow,
        to: Stage,
        update: Update,
        event: str,
        detail: Mapping[str, Any] | None = None,
    ) -> LedgerRow:
        """A compare-and-set from the row's stage, carrying pending counters."""
        full: Update = dict(update)  # type: ignore[assignment]
        attempts = self._attempts.pop(row.row_id, 0)
        polls = self._polls.pop(row.row_id, 0)
        if attempts:
            full["attempts_delta"] = attempts
        if polls:
            full["polls_delta"] = polls
        try:
            moved = await self.ledger.transition(row.row_id, row.stage, to, full,
                                                 event=event, detail=detail, current=row)
            if to not in ACTIVE_STAGES:
                self._leased.discard(row.row_id)
            return moved
        except LedgerError:
            # Put the counters back so they are not lost with the failed write.
            if attempts:
                self._attempts[row.row_id] = self._attempts.get(row.row_id, 0) + attempts
            if polls:
                self._polls[row.row_id] = self._polls.get(row.row_id, 0) + polls
            raise


async def _put(send: MemoryObjectSendStream[T], item: T) -> None:
    """Send without first yielding to the loop when the buffer has room.

    ``send`` always checkpoints; on the hot path that is one extra event-loop
    round per row. Cancellation still lands at the next real wait.
    """
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)


def _publish(tmp: Path, final: Path) -> None:
    """Rename into place and make the rename durable, so the ledger never calls
    complete an output that a power cut could still take away."""
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_publish(src: Path, tmp: Path, final: Path) -> None:
    with src.open("rb") as fin, tmp.open("wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    _publish(tmp, final)


def run_identity(command: str = "") -> dict[str, Any]:
    """Who runs: pid, host, start time (recorded in the ledger's runs table)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
            "command": command}

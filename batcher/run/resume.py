"""Resume decisions: what a ledger row means next to its manifest row.

Before any request, each imported row is compared with what the ledger
holds: a complete row is skipped (or downloaded again if its output went
missing), a submitted one is polled, never posted again under a new key; a
file whose bytes changed becomes a new request; a failed row is retried only
with ``--retry-failed``; a row that repeats an earlier row's request follows
it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..client import GenerationStatus
from ..errors import TransitionConflict
from ..keys import FileSource, ProjectSource, derive_key
from ..model import Kind, LedgerRow, NewRow, Stage, Update
from ..ops.logs import (
    ROW_INVALID,
    ROW_MOVED_ELSEWHERE,
    ROW_OUTPUT_MISSING,
    ROW_SOURCE_CHANGED,
    event,
)
from ..outputs import output_intact
from .context import RunContext

__all__ = ["Resume", "source_change", "source_key"]

log = logging.getLogger(__name__)


def source_change(row: LedgerRow, *, key: str, sha: str, size: int | None
                  ) -> tuple[Update, dict[str, Any]]:
    """The move of a file row whose bytes changed to a new request, and its event detail.

    Nothing of the old request is kept: the new key, a fresh project to come,
    no generation, no upload session. The old ones go to the event's detail.
    """
    reset: Update = {
        "idempotency_key": key, "base_key": None, "retry_count": 0,
        "source_sha256": sha, "source_size": size,
        "api_project_id": None, "generation_id": None, "api_status": None,
        "upload_url": None, "upload_method": None, "upload_expires_at": None,
        "upload_session": None, "upload_id": None, "queue_position": None,
        "output_path": None, "output_sha256": None, "output_size": None, "error": None,
    }
    detail = {"oldSha256": row.source_sha256, "newSha256": sha,
              "oldKey": row.idempotency_key, "oldProjectId": row.api_project_id,
              "oldGenerationId": row.generation_id, "oldStage": row.stage.value}
    return reset, detail


def source_key(row: LedgerRow, sha: str, namespace: str) -> str:
    """The key of a file row whose file now holds the bytes ``sha``.

    An explicit key stays the row's (the first one, before any
    ``--retry-failed`` suffix); a derived one is derived from the new bytes.
    """
    if row.explicit_key and row.idempotency_key:
        return row.base_key or row.idempotency_key
    return derive_key(model=row.model_key, source=FileSource(sha), sampling=row.sampling,
                      params=row.params, namespace=namespace)


class Resume:
    """Prepares imported rows for the stages; see the module docstring."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    async def prepare(self, new: NewRow, row: LedgerRow) -> LedgerRow | None:
        """What the manifest row says about the ledger row, before any request.

        Returns the row when it has work to do, None when not (invalid,
        complete, failed, a follower). On a shared ledger another host may
        have prepared the same row first: its compare-and-set wins.
        """
        try:
            return await self._prepare(new, row)
        except TransitionConflict:
            if not self.ctx.membership.shared:
                raise
            log.info("row %s was prepared by another host first", row.row_id,
                     extra=event(ROW_MOVED_ELSEWHERE, row=row.row_id, step="prepare"))
            return None

    async def _prepare(self, new: NewRow, row: LedgerRow) -> LedgerRow | None:
        ctx = self.ctx
        if new.error is not None:
            ctx.stats.rows_invalid += 1
            log.warning("%s", new.error.get("message"),
                        extra=event(ROW_INVALID, row=new.row_id))
            return None
        if row.kind is Kind.FILE and row.source_sha256 != new.source_sha256:
            row = await self._source_changed(new, row)
        if row.leader_row_id is not None:
            await self._check_follower(new, row)
            return None
        if row.stage is Stage.FAILED:
            if not ctx.settings.retry_failed:
                return None
            retried = await self._retry_failed(row)
            if retried is None:
                return None
            row = retried
        if row.stage is Stage.COMPLETE:
            if row.kind is Kind.FILE and not await output_intact(row):
                log.warning("output of row %s is missing or changed: downloading it again",
                            row.row_id, extra=event(ROW_OUTPUT_MISSING, row=row.row_id))
                return await ctx.move(row, Stage.GENERATED, {}, "outputMissing")
            ctx.stats.rows_skipped += 1
            return None
        return row

    async def _source_changed(self, new: NewRow, row: LedgerRow) -> LedgerRow:
        """A file edited since its row was keyed: report it, restore the new audio.

        Nothing of the old request is reused: a fresh key (from the new bytes)
        and a fresh project, so the old generation can never be downloaded for
        the new audio. The old key, project and generation stay in the row's
        history (event ``sourceChanged``).
        """
        self.ctx.stats.source_changed += 1
        assert new.idempotency_key is not None and new.source_sha256 is not None
        reset, detail = source_change(row, key=new.idempotency_key, sha=new.source_sha256,
                                      size=new.source_size)
        in_flight = row.stage in (Stage.UPLOADED, Stage.SUBMITTED, Stage.GENERATED)
        log.warning(
            "%s changed on disk since its row was keyed (%s -> %s)%s; "
            "restoring the new audio as a new request",
            new.source_path, (row.source_sha256 or "")[:12], (new.source_sha256 or "")[:12],
            f"; generation {row.generation_id or '(maybe posted)'} of the old audio is "
            "abandoned" if in_flight else "",
            extra=event(ROW_SOURCE_CHANGED, row=row.row_id),
        )
        return await self.ctx.move(row, Stage.PENDING, reset, "sourceChanged", detail)

    async def _check_follower(self, new: NewRow, row: LedgerRow) -> None:
        """A row that repeats an earlier row's request waits for that row."""
        if row.stage is not Stage.PENDING or row.leader_row_id is None:
            return
        leader = await self.ctx.ledger.get(row.leader_row_id)
        if leader is not None and leader.request_digest != new.request_digest:
            error = {
                "code": "idempotencyKeyReused",
                "message": f"idempotencyKey {new.idempotency_key!r} is already used by row "
                           f"{leader.row_id} (line {leader.line}) with another request on the "
                           "same project; the API would silently replay that one",
                "httpStatus": None,
            }
            await self.ctx.move(row, Stage.FAILED, {"error": error}, "idempotencyKeyReused")
            self.ctx.stats.failed += 1

    async def _retry_failed(self, row: LedgerRow) -> LedgerRow | None:
        """--retry-failed: move a failed row back to where its work resumes."""
        error = dict(row.error or {})
        code = error.get("code")
        if code == "invalidRow":
            return None
        last = GenerationStatus.of(row.api_status)
        if last is GenerationStatus.FAILED and row.generation_id:
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
                             params=row.params, namespace=self.ctx.settings.key_namespace,
                             retry=retry)
            if row.explicit_key and row.idempotency_key:
                key = f"{(row.base_key or row.idempotency_key)[:240]}~retry{retry}"
            update: Update = {
                "idempotency_key": key, "base_key": row.base_key or row.idempotency_key,
                "retry_count": retry, "generation_id": None, "api_status": None,
                "error": None,
            }
            to = Stage.UPLOADED if row.kind is Kind.FILE and row.api_project_id else Stage.PENDING
            return await self.ctx.move(row, to, update, "retryFailedGeneration",
                                       {"oldKey": row.idempotency_key, "retry": retry})
        if row.generation_id:
            to = Stage.SUBMITTED
            if last is GenerationStatus.COMPLETE and row.kind is Kind.FILE:
                to = Stage.GENERATED
        elif (row.kind is Kind.FILE and row.api_project_id and row.upload_url is None
              and row.upload_session is None):
            # Neither an upload URL nor an upload session left: the upload
            # was confirmed (both are cleared then) before the row failed.
            to = Stage.UPLOADED
        else:
            to = Stage.PENDING
        update = {"error": None}
        if to is Stage.PENDING and row.kind is Kind.FILE:
            update.update({"api_project_id": None, "upload_url": None, "upload_session": None,
                           "upload_id": None})
        return await self.ctx.move(row, to, update, "retryFailed", {"oldError": error})

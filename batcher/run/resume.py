"""Resume decisions: what a ledger row means next to its manifest row.

Before any request, each imported row is compared with what the ledger
holds: a complete row is skipped (or downloaded again if its output went
missing), a submitted one is polled, never posted again under a new key; a
row that asks for another request under its row id (its file's bytes, its
file, prompt, project or key namespace changed) becomes a new request; a
failed row is retried only with ``--retry-failed``; a row that repeats
another row's request follows it (:mod:`.followers`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from ..answers import GenerationStatus
from ..errors import TransitionConflict
from ..keys import (
    FileSource,
    ProjectSource,
    canonical_json,
    derive_key,
    normalize_model,
    request_digest,
    request_group,
)
from ..ledger.rules import choose_leader, holds_request, may_lead
from ..model import Kind, LedgerRow, NewRow, Stage, Update
from ..ops.logs import (
    ROW_INVALID,
    ROW_MOVED_ELSEWHERE,
    ROW_OUTPUT_MISSING,
    ROW_REQUEST_CHANGED,
    ROW_SOURCE_CHANGED,
    event,
)
from ..outputs import output_intact
from .context import RunContext
from .followers import take_over

__all__ = ["Resume", "asks_otherwise", "request_change", "source_change", "source_key"]

# What a new request clears: nothing of the old one is reused.
_CLEARED: Update = {
    "base_key": None, "retry_count": 0, "generation_id": None, "api_status": None,
    "upload_url": None, "upload_method": None, "upload_expires_at": None,
    "upload_session": None, "upload_id": None, "queue_position": None,
    "output_path": None, "output_sha256": None, "output_size": None, "error": None,
}

log = logging.getLogger(__name__)


def source_change(row: LedgerRow, *, key: str, sha: str, size: int | None
                  ) -> tuple[Update, dict[str, Any]]:
    """The move of a file row whose bytes changed to a new request, and its event detail.

    Nothing of the old request is kept: the new key, a fresh project to come,
    no generation, no upload session. The old ones go to the event's detail.
    """
    source_id = f"sha256:{sha}"
    reset: Update = {
        **_CLEARED, "idempotency_key": key, "source_sha256": sha, "source_size": size,
        "api_project_id": None, "group": request_group(key, source_id),
        "request_digest": request_digest(model=row.model_key, source_id=source_id,
                                         sampling=row.sampling, params=row.params),
    }
    detail = {"oldSha256": row.source_sha256, "newSha256": sha,
              "oldKey": row.idempotency_key, "oldProjectId": row.api_project_id,
              "oldGenerationId": row.generation_id, "oldStage": row.stage.value}
    return reset, detail


def asks_otherwise(row: LedgerRow, new: NewRow) -> bool:
    """True when the manifest row asks for another request than the ledger row holds.

    Another key (a derived key hashes the bytes, prompt, model and key
    namespace), another source (the file's bytes, the project) or, under an
    explicit key, another request. Compared on what the row holds, not on
    its stored group, which a ledger written by an older batcher may have
    left behind after a file changed.
    """
    if new.error is not None or new.idempotency_key is None:
        return False
    if (row.base_key or row.idempotency_key) != new.idempotency_key or row.kind != new.kind:
        return True
    if row.kind is Kind.FILE:
        if row.source_sha256 != new.source_sha256:
            return True
    elif row.api_project_id != new.api_project_id:
        return True
    # Under an explicit key, the request itself (a derived key hashes it).
    return row.explicit_key and _asked(row) != _asked(new)


def _asked(row: LedgerRow | NewRow) -> bytes:
    return canonical_json([normalize_model(row.model_key), row.sampling, row.params])


def request_change(row: LedgerRow, new: NewRow) -> tuple[Update, dict[str, Any]]:
    """The move of a row to the new request its manifest row asks for, and its event detail.

    Everything the manifest says is taken (a changed file's new path, new
    bytes, prompt, project, key); nothing of the old request is kept. The
    old key, project and generation go to the event's detail.
    """
    reset: Update = {
        **_CLEARED, "idempotency_key": new.idempotency_key, "kind": new.kind,
        "model_key": new.model_key, "sampling": new.sampling, "params": new.params,
        "api_project_id": new.api_project_id, "source_path": new.source_path,
        "source_sha256": new.source_sha256, "source_size": new.source_size,
        "output_rel": new.output_rel, "explicit_key": new.explicit_key,
        "request_digest": new.request_digest, "group": new.group, "leader_row_id": None,
    }
    detail = {"oldKey": row.idempotency_key, "newKey": new.idempotency_key,
              "oldSha256": row.source_sha256, "newSha256": new.source_sha256,
              "oldSource": row.source_path, "oldProjectId": row.api_project_id,
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
        # Rows a follower-to-leader takeover moved while the import runs, by
        # id: the import may hand the runner an older copy of them.
        self._taken_over: dict[str, LedgerRow] = {}

    def taken_over(self) -> list[str]:
        """The rows taken over by a follower and not prepared since (then forgotten).

        They were prepared as followers before the takeover, or are not in
        the manifest: the run looks at them again once the import is done.
        """
        ids, self._taken_over = list(self._taken_over), {}
        return ids

    async def prepare(self, new: NewRow, row: LedgerRow) -> LedgerRow | None:
        """What the manifest row says about the ledger row, before any request.

        Returns the row when it has work to do, None when not (invalid,
        complete, failed, a follower). On a shared ledger another host may
        have prepared the same row first: its compare-and-set wins.
        """
        taken = self._taken_over.pop(row.row_id, None)
        if taken is not None and taken.version > row.version:
            row = replace(taken, line=row.line, retired=row.retired)
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
        if asks_otherwise(row, new):
            row = await self._request_changed(new, row)
        elif (row.source_path, row.output_rel, row.group, row.request_digest) != (
                new.source_path, new.output_rel, new.group, new.request_digest):
            row = await self._moved(new, row)
        if row.leader_row_id is not None:
            if row.stage is Stage.FAILED and ctx.settings.retry_failed:
                # Its leader is retried (or was): the follower follows it again.
                row = await ctx.move(row, Stage.PENDING, {"error": None}, "retryFailed",
                                     {"oldError": dict(row.error or {})})
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

    async def _request_changed(self, new: NewRow, row: LedgerRow) -> LedgerRow:
        """A row that asks for another request: report it, send the new one.

        Nothing of the old request is reused: the new key, a fresh project,
        so the old generation can never be downloaded for the new request.
        The old key, project and generation stay in the row's history (event
        ``sourceChanged`` when only the file's bytes changed, else
        ``requestChanged``). A follower waiting on the old request takes it
        over first; the row joins its new group (and may follow its leader).
        """
        ctx = self.ctx
        in_flight = row.stage in (Stage.UPLOADED, Stage.SUBMITTED, Stage.GENERATED)
        abandoned = (f"; generation {row.generation_id or '(maybe posted)'} of the old "
                     "request is abandoned" if in_flight else "")
        same_file = row.kind is Kind.FILE and row.source_path == new.source_path
        bytes_only = (same_file and row.source_sha256 != new.source_sha256
                      and row.request_digest != new.request_digest
                      and row.sampling == new.sampling and row.params == new.params)
        if bytes_only:
            ctx.stats.source_changed += 1
            log.warning("%s changed on disk since its row was keyed (%s -> %s)%s; "
                        "restoring the new audio as a new request", new.source_path,
                        (row.source_sha256 or "")[:12], (new.source_sha256 or "")[:12],
                        abandoned, extra=event(ROW_SOURCE_CHANGED, row=row.row_id))
        else:
            log.warning("row %s (line %d) asks for another request than the ledger holds "
                        "for it%s; sending the new one", row.row_id, new.line, abandoned,
                        extra=event(ROW_REQUEST_CHANGED, row=row.row_id))
        if may_lead(row) and holds_request(row) and row.group is not None:
            await self._hand_over(row)
        reset, detail = request_change(row, new)
        if new.group is not None:
            leader = choose_leader(await ctx.ledger.group_rows(new.group), row.row_id)
            reset["leader_row_id"] = leader.row_id if leader is not None else None
        name = "sourceChanged" if bytes_only else "requestChanged"
        return await ctx.move(row, Stage.PENDING, reset, name, detail)

    async def _hand_over(self, row: LedgerRow) -> None:
        """The first follower waiting on ``row``'s request takes it over."""
        members = await self.ctx.ledger.group_rows(row.group or "")
        heirs = [m for m in members if m.leader_row_id == row.row_id
                 and m.stage is Stage.PENDING and m.row_id != row.row_id]
        if heirs:
            taken = await take_over(self.ctx, heirs[0], row)
            self._taken_over[taken.row_id] = taken

    async def _moved(self, new: NewRow, row: LedgerRow) -> LedgerRow:
        """The same request under a new path or output: the row follows the manifest.

        A complete file row whose explicit output moved is downloaded again
        to its new place (the generation is kept: nothing is paid). The group
        and digest are written again too (an older batcher left them as they
        were when a file changed).
        """
        update: Update = {"source_path": new.source_path, "output_rel": new.output_rel,
                          "group": new.group, "request_digest": new.request_digest}
        to = row.stage
        if (row.stage is Stage.COMPLETE and row.kind is Kind.FILE
                and row.output_rel != new.output_rel and row.generation_id is not None):
            to = Stage.GENERATED
        return await self.ctx.move(row, to, update, "manifestMoved",
                                   {"oldSource": row.source_path, "oldOutput": row.output_rel})

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

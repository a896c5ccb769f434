"""The upload stage: a file row's project, its bytes at the API, checked and confirmed.

``create_project`` says how the file goes up. Today's API answers an upload
session: the file goes to the upload host in parts (``start``, one ``PUT``
per part, ``complete``), then ``complete_project_upload`` confirms it. The
seed-era API answered one signed URL for one ``PUT``. Either way the row
reaches UPLOADED, the only stage from which a generation is posted, once
the project holds the file, and only then:

* **What was sent is what was keyed.** The sha256 of the bytes that actually
  left (not of the file as it was when the row was keyed) is compared with
  the row's ``source_sha256`` before the upload is completed and confirmed.
  A file edited in the meantime is never posted under the old bytes' key:
  the upload is aborted, nothing is posted, and the row becomes a new
  request (new key from the new bytes, a fresh project), as a file changed
  between runs does.
* **A killed upload resumes.** The session, the upload started in it and
  every part the upload host confirmed are committed to the ledger as they
  happen, so the next run goes on from the next part while the session is
  valid. Parts sent by an earlier run are read again from disk, not sent,
  to finish the hash, and each is compared with the sha256 recorded when it
  was sent. A session that expired means a fresh project, which costs
  nothing: a project is only generated on once it is confirmed, and the
  unconfirmed one is abandoned.
* **Confirming is idempotent.** ``complete`` with the same parts, and
  ``complete_project_upload``, may be sent again after any crash.

Each part is retried on its own (the run's one retry loop); an upload given
up because its row fails is aborted at the upload host. A file larger than
the session's ``maxBytes`` (or refused with 413 by ``create_project``) fails
its row as ``invalidRow`` before any byte is sent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import mimetypes
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from ..answers import ProjectCreated
from ..errors import (
    ApiError,
    Conflict,
    LocalFileError,
    StatusError,
    SubmissionsStopped,
    UrlExpired,
)
from ..keys import sha256_file
from ..model import LedgerRow, Stage, UploadPart, UploadSession
from ..ops.logs import (
    ROW_SOURCE_CHANGED,
    UPLOAD_ABANDONED,
    UPLOAD_RESTARTED,
    UPLOAD_RESUMED,
    UPLOAD_URL_EXPIRED,
    event,
)
from .context import RunContext
from .resume import source_change, source_key

__all__ = [
    "DOCUMENTED_UPLOAD_LIMIT",
    "FRESH_PROJECT_LIMIT",
    "SOURCE_CHANGE_LIMIT",
    "Uploader",
    "plan_parts",
]

#: The most bytes today's API takes in one upload, as documented (its
#: sessions' ``maxBytes`` default); the dry run warns about larger files.
DOCUMENTED_UPLOAD_LIMIT = 2 * 1024**3

log = logging.getLogger(__name__)

# An upload URL or session that keeps expiring gets this many fresh projects, no more.
FRESH_PROJECT_LIMIT = 3
# A file that keeps changing while it is uploaded is taken up again this many times.
SOURCE_CHANGE_LIMIT = 3
# An upload the upload host keeps losing is started again this many times.
RESTART_LIMIT = 3
# A session or URL about to lapse is not started on: seconds of margin.
EXPIRY_MARGIN = 30.0

_CHUNK = 1 << 20
# Upload host codes meaning it no longer has the upload the ledger describes.
_UPLOAD_LOST = frozenset({"no_such_upload", "invalid_part", "invalid_part_order",
                          "invalid_part_size"})


def plan_parts(size: int, part_size: int) -> list[tuple[int, int, int]]:
    """(number, offset, length) of every part of a ``size``-byte file, numbered from 1.

    An empty file is one empty part, as the upload host wants it.
    """
    if part_size <= 0:
        raise ValueError(f"part size must be positive, got {part_size}")
    if size <= 0:
        return [(1, 0, 0)]
    return [(i + 1, offset, min(part_size, size - offset))
            for i, offset in enumerate(range(0, size, part_size))]


class _SourceMoved(Exception):
    """The bytes sent (or re-read) are not the bytes the row was keyed on."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _FreshProject(Exception):
    """The session or URL is no good any more: start over on a fresh project."""

    def __init__(self, err: ApiError | None, why: str) -> None:
        super().__init__(why)
        self.err = err
        self.why = why


class _TooLarge(Exception):
    """The file is over what the API takes in one upload."""

    def __init__(self, message: str, http_status: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class Uploader:
    """Takes a file row from PENDING (or a halfway upload) to UPLOADED."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    async def ensure_uploaded(self, row: LedgerRow) -> LedgerRow | None:
        """The row at UPLOADED, or None when it failed here (already recorded).

        ``ApiError``s that end the row (or halt the run) and ``LocalFileError``s
        of an unreadable file are raised for the caller to record; an upload
        in parts that is given up because of them is aborted first.
        """
        ctx = self.ctx
        fresh = changes = 0
        # A URL or session handed out in this run is tried whatever its expiry
        # says (our clock may be off); one kept from an earlier run is judged
        # by its expiry first.
        kept = row.stage is Stage.PROJECT_CREATED
        while row.stage is not Stage.UPLOADED:
            if ctx.halted:
                raise SubmissionsStopped("not uploaded: the run stopped submitting")
            try:
                if row.stage is Stage.PENDING:
                    row = await self._create_project(row)
                    kept = False
                elif row.upload_session is not None:
                    row = await self._upload_in_parts(row, row.upload_session, judge=kept)
                elif row.upload_url is not None and not (
                        kept and self._expired(row.upload_expires_at)):
                    row = await self._upload_in_one(row, row.upload_url)
                else:
                    raise _FreshProject(None, "the upload URL expired")
            except _TooLarge as big:
                await ctx.fail(row, {"code": "invalidRow", "message": big.message,
                                     "httpStatus": big.http_status, "field": "file"})
                return None
            except (_FreshProject, _SourceMoved) as stop:
                # The row moved on inside the step (a started upload): go on from it.
                row = await ctx.ledger.get(row.row_id) or row
                if isinstance(stop, _SourceMoved):
                    changes += 1
                    restarted = await self._source_moved(row, stop.why, changes)
                    if restarted is None:
                        return None
                    row = restarted
                    ctx.stats.upload_bytes += row.source_size or 0
                    continue
                expired = stop
                fresh += 1
                if fresh > FRESH_PROJECT_LIMIT:
                    await ctx.fail(row, {"code": "uploadExpired", "httpStatus": None,
                                         "message": f"the upload kept expiring: {expired.why}, "
                                         f"on {FRESH_PROJECT_LIMIT} fresh projects"})
                    return None
                log.info("upload of row %s cannot go on (%s): a fresh project", row.row_id,
                         expired.why, extra=event(UPLOAD_URL_EXPIRED, row=row.row_id))
                ctx.stats.upload_bytes += row.source_size or 0  # all of it goes again
                row = await self._create_project(row)
                kept = False
        return row

    # -- create_project ----------------------------------------------------------

    async def _create_project(self, row: LedgerRow) -> LedgerRow:
        """A project for the file, durably in the ledger before anything is sent."""
        ctx = self.ctx
        assert row.source_path is not None
        path = Path(row.source_path)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        size = row.source_size
        if size is None:
            size = (await anyio.Path(path).stat()).st_size

        async def create() -> ProjectCreated:
            await ctx.check_lease(row.row_id)  # a host paused past its lease stops here
            return await ctx.client.create_project(
                file_name=path.name, content_type=ctype, content_length=size)

        try:
            created = await ctx.call(row.row_id, create)
        except StatusError as err:
            if err.status == 413:
                raise _TooLarge(f"{path} is {size} bytes, over the API's upload limit: "
                                f"{err.message}", 413) from err
            raise
        session = created.upload
        if session is not None and session.max_bytes is not None and size > session.max_bytes:
            # The project exists but nothing was sent; it is left unconfirmed.
            raise _TooLarge(f"{path} is {size} bytes; the API takes at most "
                            f"{session.max_bytes} bytes in one upload", None)
        # The project id is durable before anything else happens: a generation
        # is keyed on (key, project), so a second project would be a second charge.
        return await ctx.move(row, Stage.PROJECT_CREATED, {
            "api_project_id": created.api_project_id,
            "upload_url": created.upload_url,
            "upload_method": created.upload_method if session is None else None,
            "upload_expires_at": created.expires_at,
            "upload_session": session,
            "upload_id": None,
            "content_type": ctype,
        }, "projectCreated", {"apiProjectId": created.api_project_id,
                              "upload": "parts" if session is not None else "url"})

    # -- the seed era: one PUT ---------------------------------------------------

    async def _upload_in_one(self, row: LedgerRow, url: str) -> LedgerRow:
        ctx = self.ctx
        assert row.source_path is not None
        sent = hashlib.sha256()

        async def put() -> None:
            nonlocal sent
            sent = hashlib.sha256()
            await ctx.client.storage.upload(
                url=url, method=row.upload_method or "PUT", path=Path(row.source_path or ""),
                content_type=row.content_type or "application/octet-stream",
                size=row.source_size or 0, digests=(sent,))

        try:
            await ctx.call(row.row_id, put)
        except UrlExpired as err:
            raise _FreshProject(err, "the upload URL was refused") from err
        except LocalFileError as err:
            if err.code == "fileChanged":
                raise _SourceMoved(err.message) from err
            raise
        ctx.stats.uploaded_bytes += row.source_size or 0
        # Sent, but not the bytes that were keyed: nothing is posted on it.
        self._check_sent(row, sent.hexdigest())
        return await ctx.move(row, Stage.UPLOADED, {"upload_url": None}, "uploaded",
                              {"sha256": sent.hexdigest()})

    # -- today's API: parts on the upload host -----------------------------------

    async def _upload_in_parts(self, row: LedgerRow, session: UploadSession, *,
                               judge: bool) -> LedgerRow:
        """Start or go on with the upload; ``judge``: a session kept from an
        earlier run, which is not started on when its expiry is near."""
        ctx = self.ctx
        storage = ctx.client.storage
        if judge and self._expired(session.expires_at):
            return await self._after_expiry(row, session, None)
        restarts = 0
        while True:
            upload_id = row.upload_id
            try:
                if upload_id is None:
                    started = await ctx.call(row.row_id,
                                             functools.partial(storage.start_upload, session))
                    session = replace(session, part_size=started.part_size)
                    upload_id = started.upload_id
                    row = await ctx.move(row, Stage.PROJECT_CREATED, {
                        "upload_id": upload_id, "upload_session": session,
                    }, "uploadStarted", {"uploadId": upload_id,
                                         "partSize": started.part_size})
                parts, sent = await self._send_parts(row, session, upload_id)
                self._check_sent(row, sent)
                await ctx.call(row.row_id, functools.partial(
                    storage.complete_upload, session, upload_id, parts))
            except _SourceMoved:
                if upload_id is not None:
                    await self._abandon(row, session, upload_id, "sourceChanged")
                raise
            except SubmissionsStopped:
                raise  # a halt: the upload stays as it is, for the next run
            except (ApiError, LocalFileError) as err:
                code = getattr(err, "code", "")
                if code in _UPLOAD_LOST and upload_id is not None and restarts < RESTART_LIMIT:
                    # The host no longer has what the ledger says was sent:
                    # a new upload in the same session.
                    restarts += 1
                    log.info("the upload host lost the upload of row %s (%s): a new upload",
                             row.row_id, code,
                             extra=event(UPLOAD_RESTARTED, row=row.row_id, code=code))
                    row = await ctx.move(row, Stage.PROJECT_CREATED, {"upload_id": None},
                                         "uploadRestarted", {"oldUploadId": upload_id})
                    ctx.stats.upload_bytes += row.source_size or 0
                    continue
                if isinstance(err, UrlExpired):
                    return await self._after_expiry(row, session, err)
                if isinstance(err, Conflict):
                    # Completed or confirmed with something else: never build on it.
                    raise _FreshProject(err, f"the upload host refused: {err.message}") from err
                if upload_id is not None and not (isinstance(err, ApiError)
                                                  and err.halts_submissions):
                    # The row fails: give the parts back. (A halt keeps them,
                    # so the same command resumes the upload.)
                    await self._abandon(row, session, upload_id, code)
                raise
            return await self._confirm(row, sent)

    async def _send_parts(self, row: LedgerRow, session: UploadSession, upload_id: str
                          ) -> tuple[list[UploadPart], str]:
        """Every part sent or, if an earlier run sent it, read again; (parts, sha256 of all)."""
        ctx = self.ctx
        assert row.source_path is not None and row.source_size is not None
        path = Path(row.source_path)
        await _check_size(path, row.source_size)
        recorded = {p.number: p for p in await ctx.ledger.upload_parts(row.row_id, upload_id)}
        total = hashlib.sha256()
        parts: list[UploadPart] = []
        resumed = 0
        for number, offset, length in plan_parts(row.source_size, session.part_size):
            known = recorded.get(number)
            if known is not None and known.size == length:
                # Sent by an earlier run: read, not sent, to go on with the hash.
                digest = await anyio.to_thread.run_sync(_hash_range, path, offset, length, total)
                if digest != known.sha256:
                    raise _SourceMoved(f"part {number} of {path} changed on disk since it "
                                       "was sent")
                parts.append(known)
                resumed += 1
                ctx.stats.uploaded_bytes += length
                continue
            if resumed and len(parts) == resumed:
                log.info("upload of row %s goes on from part %d", row.row_id, number,
                         extra=event(UPLOAD_RESUMED, row=row.row_id, parts=resumed))
            if ctx.halted:
                raise SubmissionsStopped("not uploaded: the run stopped submitting")
            part, total = await self._send_part(row, session, upload_id, number, offset,
                                                length, total)
            await ctx.ledger.record_part(row.row_id, upload_id, part)
            ctx.stats.uploaded_bytes += length
            parts.append(part)
        return parts, total.hexdigest()

    async def _send_part(self, row: LedgerRow, session: UploadSession, upload_id: str,
                         number: int, offset: int, length: int, total: Any
                         ) -> tuple[UploadPart, Any]:
        """One part, retried on its own; the hash of all sent so far goes on only
        with the attempt that was answered."""
        ctx = self.ctx
        path = Path(row.source_path or "")

        async def put() -> tuple[UploadPart, Any]:
            part_digest, running = hashlib.sha256(), total.copy()
            etag = await ctx.client.storage.put_part(
                session, upload_id, number, path=path, offset=offset, length=length,
                digests=(part_digest, running))
            return UploadPart(number, etag, length, part_digest.hexdigest()), running

        try:
            return await ctx.call(row.row_id, put)
        except LocalFileError as err:
            if err.code == "fileChanged":
                raise _SourceMoved(err.message) from err
            raise

    async def _confirm(self, row: LedgerRow, sent: str) -> LedgerRow:
        """``complete_project_upload``, then UPLOADED: generations may be posted now."""
        ctx = self.ctx
        assert row.api_project_id is not None
        project = row.api_project_id
        await ctx.call(row.row_id, lambda: ctx.client.complete_project_upload(
            api_project_id=project))
        moved = await ctx.move(row, Stage.UPLOADED, {
            "upload_session": None, "upload_id": None, "upload_url": None,
        }, "uploaded", {"sha256": sent})
        await ctx.ledger.forget_parts(row.row_id)
        return moved

    async def _after_expiry(self, row: LedgerRow, session: UploadSession,
                            err: UrlExpired | None) -> LedgerRow:
        """The session is over. If every part was sent (a run killed before or
        after ``complete``), the project may still be confirmed; else a fresh one."""
        ctx = self.ctx
        why = "the upload session expired" if err is None else err.message
        if row.upload_id is None or row.source_size is None:
            raise _FreshProject(err, why)
        recorded = await ctx.ledger.upload_parts(row.row_id, row.upload_id)
        plan = plan_parts(row.source_size, session.part_size)
        if [(p.number, p.size) for p in recorded] != [(n, size) for n, _, size in plan]:
            raise _FreshProject(err, why)
        path = Path(row.source_path or "")
        await _check_size(path, row.source_size)
        total = hashlib.sha256()
        for part, (_, offset, length) in zip(recorded, plan, strict=True):
            digest = await anyio.to_thread.run_sync(_hash_range, path, offset, length, total)
            if digest != part.sha256:
                raise _FreshProject(err, f"{why}, and part {part.number} changed on disk")
        self._check_sent(row, total.hexdigest())
        try:
            return await self._confirm(row, total.hexdigest())
        except Conflict as missing:  # UPLOAD_MISSING: the upload was never completed
            raise _FreshProject(missing, why) from missing

    async def _abandon(self, row: LedgerRow, session: UploadSession, upload_id: str,
                       code: str) -> None:
        """Abort an upload given up; an abort that fails changes nothing for the row."""
        log.info("upload of row %s is given up (%s): aborting it", row.row_id, code,
                 extra=event(UPLOAD_ABANDONED, row=row.row_id, code=code))
        # An abort that fails is left to the host, which drops unfinished uploads in time.
        with contextlib.suppress(ApiError):
            await self.ctx.client.storage.abort_upload(session, upload_id)

    # -- the file moved under the upload --------------------------------------------

    def _check_sent(self, row: LedgerRow, sent: str) -> None:
        if sent != row.source_sha256:
            raise _SourceMoved(f"{row.source_path} changed after it was keyed: the bytes "
                               f"sent hash to {sent[:12]}, not {(row.source_sha256 or '')[:12]}")

    async def _source_moved(self, row: LedgerRow, why: str, changes: int) -> LedgerRow | None:
        """The file changed under its upload: a new request from its bytes now.

        Nothing was posted on the old project. As between runs, the row gets
        the key of the new bytes and a fresh project; a file that keeps
        changing fails ``fileChanged`` after SOURCE_CHANGE_LIMIT tries.
        """
        ctx = self.ctx
        path = Path(row.source_path or "")
        try:
            sha, size = await anyio.to_thread.run_sync(sha256_file, path)
        except OSError as exc:
            raise LocalFileError(f"cannot read {path}: {exc.strerror or exc}",
                                 code="fileUnreadable") from exc
        if changes > SOURCE_CHANGE_LIMIT:
            await ctx.fail(row, {"code": "fileChanged", "httpStatus": None,
                                 "message": f"{path} kept changing while it was uploaded "
                                 f"({changes} times); nothing was posted for it"})
            return None
        ctx.stats.source_changed += 1
        key = source_key(row, sha, ctx.settings.key_namespace)
        reset, detail = source_change(row, key=key, sha=sha, size=size)
        log.warning("%s: %s; nothing was posted for it, restoring its new audio as a new "
                    "request", path, why, extra=event(ROW_SOURCE_CHANGED, row=row.row_id))
        return await ctx.move(row, Stage.PENDING, reset, "sourceChanged",
                              {**detail, "step": "upload", "why": why})

    def _expired(self, stamp: str | None) -> bool:
        if not stamp:
            return False
        if stamp == "expired":
            return True
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return False
        return when <= self.ctx.wall() + EXPIRY_MARGIN


async def _check_size(path: Path, size: int) -> None:
    """The file is still the size it was keyed at; else it moved under its row."""
    from ..storage import check_file_size  # storage brings aiohttp: only uploads need it

    try:
        await check_file_size(path, size)
    except LocalFileError as err:
        if err.code == "fileChanged":
            raise _SourceMoved(err.message) from err
        raise


def _hash_range(path: Path, offset: int, length: int, total: Any) -> str:
    """The sha256 of bytes ``offset..offset+length`` of ``path``; they go on into ``total``.

    Runs on a worker thread. A file that ends early is a changed file.
    """
    digest = hashlib.sha256()
    left = length
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while left > 0:
                data = f.read(min(_CHUNK, left))
                if not data:
                    raise _SourceMoved(f"{path} became shorter since part bytes were sent")
                left -= len(data)
                digest.update(data)
                total.update(data)
    except OSError as exc:
        raise LocalFileError(f"cannot read {path}: {exc.strerror or exc}",
                             code="fileUnreadable") from exc
    return digest.hexdigest()

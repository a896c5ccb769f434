"""The download stage: fetch a finished file row's output into ``--out``.

A GENERATED row only moves on to COMPLETE or FAILED: a download failure
never leads to a new generation. The output appears under its final name
only when complete (temp file, fsync, rename), and its sha256 is recorded
with the move to COMPLETE.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..errors import (
    ApiError,
    ClientError,
    Conflict,
    DiskFull,
    LocalFileError,
    TransitionConflict,
    UrlExpired,
)
from ..model import LedgerRow, Stage
from ..ops.logs import DISK_FULL, DOWNLOAD_RETRY_SCHEDULED, event
from ..outputs import default_output_for, fetch_to_file, resolve_output
from ..retry import retrying
from .context import RunContext
from .streams import take

__all__ = ["Downloader"]

log = logging.getLogger(__name__)

# A signed download URL refused this many times in a row fails the row.
DOWNLOAD_URL_LIMIT = 5


class Downloader:
    """Download workers take GENERATED file rows from a stream."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    async def worker(self, recv: MemoryObjectReceiveStream[LedgerRow]) -> None:
        """Download each row received, until the stream ends or the run stops."""
        async with recv:
            while (row := await take(recv)) is not None:
                try:
                    await self.download(row)
                except TransitionConflict as err:
                    # A shared ledger: another host finished the row first.
                    self.ctx.lost(row.row_id, err, "download")

    async def download(self, row: LedgerRow) -> None:
        """Fetch the row's output and publish it; COMPLETE, or FAILED."""
        ctx = self.ctx
        generation, project = row.generation_id, row.api_project_id
        assert generation is not None and project is not None
        out = ctx.settings.out

        async def attempt() -> tuple[Path, str, int]:
            # A fresh signed URL on every attempt: the last one may have expired.
            info = await ctx.client.get_download(generation_id=generation,
                                                 api_project_id=project)
            # Resolved again on every attempt: a symlink planted since the
            # last check must not lead the write outside --out.
            final = resolve_output(out, row.output_rel or default_output_for(
                row, ctx.settings.manifest.parent, info.mime_type, plain_model=ctx.settings.model))
            sha, size = await fetch_to_file(ctx.client.storage, info.download_url, final,
                                            root=out)
            return final, sha, size

        def retried(err: ApiError, made: int, wait: float) -> None:
            log.info("download of row %s failed, retrying in %.2f s: %s", row.row_id, wait, err,
                     extra=event(DOWNLOAD_RETRY_SCHEDULED, row=row.row_id, code=err.code,
                                 attempt=made, wait=round(wait, 3)))

        try:
            if row.output_rel:
                resolve_output(out, row.output_rel)
            final, sha, size = await retrying(
                attempt, self._decide, clock=ctx.clock,
                before=lambda: ctx.count_attempt(row.row_id), on_retry=retried)
        except LocalFileError as err:
            if _no_space(err):
                await self._disk_full(row, out)
                return
            await ctx.fail(row, err.to_record())
            return
        except ApiError as err:
            if err.halts_run:
                ctx.halt(err)
                ctx.cancel()
                return
            await ctx.fail(row, err.to_record())
            return
        await ctx.move(row, Stage.COMPLETE, {
            "output_path": str(final), "output_sha256": sha, "output_size": size,
        }, "downloaded", {"output": str(final), "sha256": sha, "size": size})
        ctx.stats.done += 1
        ctx.stats.in_flight -= 1

    async def _disk_full(self, row: LedgerRow, out: Path) -> None:
        """No space for the output: not the row's fault. Stop buying generations;
        the row stays GENERATED, for the next run to download."""
        ctx = self.ctx
        free = await anyio.to_thread.run_sync(_free_bytes, out)
        needed = row.source_size
        about = f"about {_size(needed)}" if needed else "more space"
        err = DiskFull(
            f"no space left in {out} (free: {_size(free)}): the output of row {row.row_id} "
            f"needs {about}; submissions stopped, finished generations wait for their "
            "download: free space and run the same command again", folder=str(out),
            needed=needed)
        log.error("%s", err, extra=event(DISK_FULL, folder=str(out), row=row.row_id,
                                         needed=needed))
        ctx.halt(err)
        ctx.drop(row.row_id)

    def _decide(self, err: ApiError, made: int) -> float | None:
        """The retry policy, and two rules of downloads: a refused signed URL
        is asked for again at once, and a result not ready yet is waited for."""
        settings = self.ctx.settings
        if isinstance(err, UrlExpired) and made < DOWNLOAD_URL_LIMIT:
            return 0.0
        # Before the audio is ready the API may answer 404 or 409: retry later.
        not_ready = isinstance(err, Conflict) or (
            isinstance(err, ClientError) and err.status == 404)
        if not_ready and made < settings.max_attempts * 2:
            return min(30.0, settings.poll_interval * made + 0.5)
        return self.ctx.decide(err, made)


# The device is full, or the user's quota on it is used up.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def _no_space(err: LocalFileError) -> bool:
    cause = err.__cause__
    return isinstance(cause, OSError) and cause.errno in _NO_SPACE


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the device of ``folder`` (or its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("bytes", "KB", "MB"):
        if value < 1024:
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"

"""The download stage: fetch a finished file row's output into ``--out``.

A GENERATED row only moves on to COMPLETE or FAILED: a download failure
never leads to a new generation. The output appears under its final name
only when complete (temp file, fsync, rename), and its sha256 is recorded
with the move to COMPLETE.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..errors import ApiError, ClientError, Conflict, LocalFileError, UrlExpired
from ..model import LedgerRow, Stage
from ..outputs import default_output_for, publish
from ..paths import resolve_output, write_atomically_target
from .context import RunContext, StopRun

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
            async for row in recv:
                try:
                    await self.download(row)
                except StopRun:
                    self.ctx.cancel()
                    return

    async def download(self, row: LedgerRow) -> None:
        """Fetch the row's output and publish it; COMPLETE, or FAILED."""
        ctx = self.ctx
        out = ctx.settings.out
        assert row.generation_id is not None and row.api_project_id is not None
        rel = row.output_rel
        final: Path | None = None
        try:
            if rel:
                final = resolve_output(out, rel)
        except LocalFileError as err:
            await ctx.fail(row, err.to_record())
            return
        attempt = 0
        while True:
            attempt += 1
            ctx.count_attempt(row.row_id)
            try:
                info = await ctx.client.get_download(
                    generation_id=row.generation_id, api_project_id=row.api_project_id)
                # Resolved again on every attempt: a symlink planted since the
                # last check must not lead the write outside --out.
                final = resolve_output(out, rel or default_output_for(
                    row, ctx.settings.manifest.parent, info.mime_type))
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = write_atomically_target(final, row.row_id)
                try:
                    sha, size = await ctx.client.download(url=info.download_url, dest=tmp)
                    await anyio.to_thread.run_sync(publish, tmp, final)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            except LocalFileError as err:
                await ctx.fail(row, err.to_record())
                return
            except ApiError as err:
                wait = self._wait(err, attempt)
                if wait is None:
                    if err.halts_run:
                        ctx.halt(err)
                        raise StopRun() from err
                    await ctx.fail(row, err.to_record())
                    return
                log.info("download.retry %s", err, extra={"row": row.row_id})
                await ctx.clock.sleep(wait)
                continue
            except OSError as err:
                await ctx.fail(row, {"code": "outputWriteFailed", "httpStatus": None,
                                     "message": f"cannot write {final}: {err}"})
                return
            await ctx.move(row, Stage.COMPLETE, {
                "output_path": str(final), "output_sha256": sha, "output_size": size,
            }, "downloaded", {"output": str(final), "sha256": sha, "size": size})
            ctx.stats.done += 1
            ctx.stats.in_flight -= 1
            return

    def _wait(self, err: ApiError, attempt: int) -> float | None:
        settings = self.ctx.settings
        if isinstance(err, UrlExpired) and attempt < DOWNLOAD_URL_LIMIT:
            return 0.0
        # Before the audio is ready the API may answer 404 or 409: retry later.
        not_ready = isinstance(err, Conflict) or (
            isinstance(err, ClientError) and err.status == 404)
        if not_ready and attempt < settings.max_attempts * 2:
            return min(30.0, settings.poll_interval * attempt + 0.5)
        return self.ctx.policy.decide(err, attempt, self.ctx.rng)

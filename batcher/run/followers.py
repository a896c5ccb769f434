"""Followers: rows that repeat an earlier row's request take its outcome.

Two rows with the same key on the same source are one logical request: the
first (the leader) is posted, the others follow it and are settled once the
run's work is done — no request of their own, no second charge. A file
follower gets a copy of the leader's output under its own name.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path

from ..errors import LocalFileError, TransitionConflict
from ..model import ACTIVE_STAGES, Kind, LedgerRow, Stage
from ..ops.logs import ROW_MOVED_ELSEWHERE, event
from ..outputs import copy_to_file, default_output_for, resolve_output
from .context import RunContext

__all__ = ["settle_followers"]

log = logging.getLogger(__name__)


async def settle_followers(ctx: RunContext) -> None:
    """Give every active follower its leader's outcome, where the leader has one."""
    followers = [r async for r in ctx.ledger.rows(stages=ACTIVE_STAGES)
                 if r.leader_row_id is not None]
    for row in followers:
        leader = await ctx.ledger.get(row.leader_row_id or "")
        if leader is None:
            continue
        try:
            await _settle(ctx, row, leader)
        except TransitionConflict:
            if not ctx.membership.shared:
                raise
            log.info("row %s was settled by another host first", row.row_id,
                     extra=event(ROW_MOVED_ELSEWHERE, row=row.row_id, step="settle"))
        except LocalFileError as err:
            await ctx.fail(row, {"code": "outputWriteFailed", "httpStatus": None,
                                 "message": str(err)})


async def _settle(ctx: RunContext, row: LedgerRow, leader: LedgerRow) -> None:
    note = {"leader": leader.row_id}
    if leader.stage is Stage.FAILED:
        error = dict(leader.error or {})
        error["message"] = (f"{error.get('message', '')} (same request as row "
                            f"{leader.row_id}, line {leader.line})").strip()
        await ctx.move(row, Stage.FAILED, {"error": error, "api_status": leader.api_status},
                       "followerFailed", note)
        return
    if leader.stage is not Stage.COMPLETE:
        return
    if row.stage is Stage.PENDING:
        row = await ctx.move(row, Stage.SUBMITTED, {
            "generation_id": leader.generation_id, "api_project_id": leader.api_project_id,
            "api_status": leader.api_status}, "followedLeader", note)
    if row.kind is not Kind.FILE:
        await ctx.move(row, Stage.COMPLETE, {"api_status": leader.api_status}, "complete", note)
        return
    if row.stage is Stage.SUBMITTED:
        row = await ctx.move(row, Stage.GENERATED, {"api_status": leader.api_status},
                             "generated", note)
    assert leader.output_path is not None
    rel = row.output_rel or default_output_for(
        row, ctx.settings.manifest.parent, mimetypes.guess_type(leader.output_path)[0])
    final = resolve_output(ctx.settings.out, rel)
    if final != Path(leader.output_path):
        await copy_to_file(Path(leader.output_path), final, root=ctx.settings.out)
    await ctx.move(row, Stage.COMPLETE, {
        "output_path": str(final), "output_sha256": leader.output_sha256,
        "output_size": leader.output_size}, "copiedFromLeader", note)

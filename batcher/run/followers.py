"""Followers: rows that repeat another row's request take its outcome.

Two rows with the same key on the same source are one logical request (a
*group*): one row, the leader, sends it; the others follow it and are
settled once the run's work is done — no request of their own, no second
charge. A file follower gets a copy of the leader's output under its own name.

Who leads does not depend on row order or on the run that sent the request:
a row that holds the request (something was sent for it) leads it, wherever
it stands (see :func:`batcher.ledger.rules.first_earlier`). A leader can
leave its group — removed from the manifest, or its own file or request
changed — while its request is at the API; then a follower takes the request
over (:func:`take_over`: same key, same project, same generation, so nothing
is paid twice) or, with nothing sent yet, simply leads
(:func:`regroup_followers`, once the import has seen the whole manifest).
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path

from ..errors import LocalFileError, TransitionConflict
from ..ledger.rules import choose_leader, holds_request
from ..model import ACTIVE_STAGES, Kind, LedgerRow, Stage, Update
from ..ops.logs import ROW_MOVED_ELSEWHERE, ROW_TOOK_OVER, event
from ..outputs import copy_to_file, default_output_for, resolve_output
from .context import RunContext

__all__ = ["leads_validly", "regroup_followers", "settle_followers", "take_over"]

log = logging.getLogger(__name__)


def leads_validly(leader: LedgerRow | None, row: LedgerRow) -> bool:
    """True when ``leader`` still leads ``row``: in the job, in the row's group,
    and a leader itself (or done: a complete row's outcome is final)."""
    return (leader is not None and not leader.retired and leader.group == row.group
            and (leader.leader_row_id is None or leader.stage is Stage.COMPLETE))


async def take_over(ctx: RunContext, row: LedgerRow, holder: LedgerRow) -> LedgerRow:
    """``row``, a waiting follower, goes on with ``holder``'s request as its leader.

    Same group, so the same request: the row takes the holder's key and
    project (a post there is a replay, never a second charge) and its
    generation, which it polls and downloads for itself. A project whose
    upload was never confirmed is not taken (no generation can exist on it;
    the row starts afresh, as nothing was paid).
    """
    update: Update = {"leader_row_id": None}
    to = Stage.PENDING
    if holder.stage is not Stage.PROJECT_CREATED:
        update.update({"idempotency_key": holder.idempotency_key, "base_key": holder.base_key,
                       "retry_count": holder.retry_count,
                       "api_project_id": holder.api_project_id})
        if holder.generation_id is not None:
            update.update({"generation_id": holder.generation_id,
                           "api_status": holder.api_status})
            to = Stage.SUBMITTED
            if holder.stage is Stage.FAILED:
                to = Stage.FAILED
                update["error"] = holder.error
        elif holder.stage is Stage.UPLOADED and row.kind is Kind.FILE:
            to = Stage.UPLOADED
        else:
            update = {"leader_row_id": None}
    log.info("row %s takes over the request of row %s (%s)", row.row_id, holder.row_id,
             holder.stage.value, extra=event(ROW_TOOK_OVER, row=row.row_id,
                                             **{"from": holder.row_id}))
    return await ctx.move(row, to, update, "tookOver",
                          {"from": holder.row_id, "fromStage": holder.stage.value,
                           "generationId": holder.generation_id})


async def regroup_followers(ctx: RunContext) -> list[LedgerRow]:
    """After the import: give every follower whose leader left a leader again.

    A follower of a row that left its group (removed from the manifest, or
    its request changed) follows the group's leader now, or takes over the
    request its old leader holds, or leads the group itself. Returns the
    rows that lead now and have work to do, for the run to send on.
    """
    stages = ACTIVE_STAGES | {Stage.FAILED}
    ids = [r.row_id async for r in ctx.ledger.rows(stages=stages) if r.leader_row_id is not None]
    ready: list[LedgerRow] = []
    for row_id in ids:
        row = await ctx.ledger.get(row_id)  # as it is now: an earlier step may have moved it
        if row is None or row.retired or row.leader_row_id is None:
            continue
        try:
            led = await _regroup(ctx, row)
        except TransitionConflict:
            if not ctx.membership.shared:
                raise
            log.info("row %s was regrouped by another host first", row.row_id,
                     extra=event(ROW_MOVED_ELSEWHERE, row=row.row_id, step="regroup"))
            continue
        if led is not None and led.stage in ACTIVE_STAGES:
            ready.append(led)
    return ready


async def _regroup(ctx: RunContext, row: LedgerRow) -> LedgerRow | None:
    old = await ctx.ledger.get(row.leader_row_id or "")
    if leads_validly(old, row):
        return None
    members = await ctx.ledger.group_rows(row.group) if row.group else []
    leader = choose_leader(members, row.row_id)
    note = {"oldLeader": row.leader_row_id}
    if leader is not None:
        await ctx.move(row, row.stage, {"leader_row_id": leader.row_id}, "leaderChanged",
                       {**note, "leader": leader.row_id})
        return None
    if (row.stage is Stage.PENDING and old is not None and old.group == row.group
            and holds_request(old)):
        return await take_over(ctx, row, old)
    return await ctx.move(row, row.stage, {"leader_row_id": None}, "leads", note)


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

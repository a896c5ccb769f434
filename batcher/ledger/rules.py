"""The ledger's decisions that need no database, shared by every backend.

* :func:`plan_move`: whether a transition may be tried at all (a legal move,
  the caller's row, known update fields), and what it writes, before
  anything is written;
* :func:`refusal`: what a compare-and-set that matched nothing means, from
  the row as it is now;
* :func:`import_refresh`: what an import does to a row the ledger already
  holds;
* :func:`first_earlier`: which row of a group leads it;
* :func:`claim_slots`: the shared pace of requests (PostgreSQL computes the
  same in its ``pace_claim`` statement, in one locked row).

Backends apply these decisions in their own storage: SQL statements or dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from batcher.errors import LedgerError, TransitionConflict
from batcher.ledger.base import PaceClaim
from batcher.ledger.codec import DELTAS, dumps_object, transition_values, update_fields
from batcher.model import (
    UPDATE_COLUMNS,
    LedgerRow,
    Stage,
    Update,
    describe_stages,
    legal_sources,
    stage_set,
)

__all__ = [
    "HOLDING_STAGES",
    "INVALID_ROW",
    "Move",
    "PaceState",
    "Refresh",
    "check_claim",
    "choose_leader",
    "claim_slots",
    "first_earlier",
    "holds_request",
    "import_refresh",
    "may_lead",
    "plan_move",
    "refusal",
    "slot_spacing",
]

# The error code of a row that failed validation: it never reached the API.
INVALID_ROW = "invalidRow"


@dataclass(frozen=True, slots=True)
class Move:
    """A transition that may be tried: from one of ``allowed`` to ``to``.

    It is made only if the row is in one of ``allowed`` and, when ``version``
    is set (the caller passed its copy of the row), still at that version.
    """

    row_id: str
    expected: frozenset[Stage]  # what the caller expects the row's stage to be
    allowed: frozenset[Stage]  # the expected stages from which the move is legal
    to: Stage
    version: int | None  # the version of the caller's copy, if it passed one
    values: dict[str, Any]  # the statement's named parameters (codec.transition_values)
    detail: str  # the event's detail as stored (JSON text)
    fields: dict[str, Any]  # the update's columns as LedgerRow fields, as stored


def plan_move(
    row_id: str,
    expect: Stage | frozenset[Stage],
    to: Stage,
    update: Update | None,
    detail: Mapping[str, Any] | None,
    current: LedgerRow | None,
) -> Move:
    """The move a transition asks for, or LedgerError before anything is written.

    Refused: a move that is legal from none of the expected stages, a
    ``current`` that is another row, an update naming unknown columns, and a
    move that may leave the stage as it is without ``current``: comparing
    the stage says nothing when the stage does not change, so such a move
    must compare the version of the caller's copy.
    """
    expected = stage_set(expect)
    allowed = legal_sources(expected, to)
    if not allowed:
        raise LedgerError(f"row {row_id}: illegal move {describe_stages(expected)} -> {to}")
    if current is not None and current.row_id != row_id:
        raise LedgerError(f"row {row_id}: current is row {current.row_id}")
    update = update or {}
    unknown = set(update) - UPDATE_COLUMNS - DELTAS
    if unknown:
        raise LedgerError(f"unknown update fields: {sorted(unknown)}")
    if current is None and to in allowed:
        raise LedgerError(
            f"row {row_id}: a move that may stay in {to} needs the caller's row (current=)"
        )
    version = None if current is None else current.version
    values = {**transition_values(row_id, to, update), "version": version}
    detail_json = dumps_object(detail or {}, "event detail") or "{}"
    fields = update_fields(update, values.get("error"))
    return Move(row_id, expected, allowed, to, version, values, detail_json, fields)


def refusal(move: Move, actual: Stage | None, version: int | None = None) -> LedgerError:
    """Why ``move`` cannot be made on a row now in stage ``actual`` at ``version``.

    No row (``actual`` None) or a stage outside the expected ones is a
    TransitionConflict: someone else moved the row. An expected stage from
    which the move is illegal is a LedgerError. An allowed stage means that
    another writer changed the row (its version moved on; on PostgreSQL it
    may also have moved away and back): a TransitionConflict naming the
    versions when the caller compared one.
    """
    expected = describe_stages(move.expected)
    if actual is None:
        return TransitionConflict(move.row_id, expected, None)
    if actual in move.expected and actual not in move.allowed:
        return LedgerError(f"row {move.row_id}: illegal move {actual} -> {move.to}")
    if actual in move.allowed and move.version is not None and version != move.version:
        return TransitionConflict(
            move.row_id, f"{expected} (version {move.version})", f"{actual} (version {version})"
        )
    return TransitionConflict(move.row_id, expected, actual.value)


class Refresh(Enum):
    """What an import does to a row it already holds; the value names its event."""

    KEEP = "kept"  # returned as stored: the runner decides what a change means
    INVALIDATE = "invalid"  # stored as FAILED with the manifest row's new error
    REVALIDATE = "revalidated"  # restarted as PENDING with the manifest row's content


def import_refresh(
    stage: Stage,
    stored_error: Mapping[str, Any] | None,
    generation_id: str | None,
    new_error: Mapping[str, Any] | None,
) -> Refresh:
    """The import's decision for a known row.

    ``new_error`` is the manifest row's validation error as the ledger would
    store it (a JSON copy). An invalid row fails a stored row only if that
    row never reached the API (PENDING) or has failed already with another
    error. A valid row restarts a stored row that failed validation, if no
    generation was ever posted for it. Anything else is kept.
    """
    if new_error is not None:
        if stage is Stage.PENDING or (stage is Stage.FAILED and stored_error != new_error):
            return Refresh.INVALIDATE
        return Refresh.KEEP
    if (
        stage is Stage.FAILED
        and stored_error is not None
        and stored_error.get("code") == INVALID_ROW
        and generation_id is None
    ):
        return Refresh.REVALIDATE
    return Refresh.KEEP


# The stages in which a row holds its request: something was sent for it (a
# project, an upload, a generation) or it is done. A FAILED row holds it
# only with a generation (the API has the failed request under its key).
HOLDING_STAGES: frozenset[Stage] = frozenset(
    {Stage.PROJECT_CREATED, Stage.UPLOADED, Stage.SUBMITTED, Stage.GENERATED, Stage.COMPLETE})


def holds_request(row: LedgerRow) -> bool:
    """True when the API already knows the row's request (see HOLDING_STAGES)."""
    return row.stage in HOLDING_STAGES or (
        row.stage is Stage.FAILED and row.generation_id is not None)


def may_lead(row: LedgerRow) -> bool:
    """True when other rows of its group may follow ``row``: a leader itself,
    or complete (its outcome is final, whoever it followed)."""
    return row.leader_row_id is None or row.stage is Stage.COMPLETE


def first_earlier(
    candidates: Iterable[tuple[bool, int, str]], line: int, row_id: str
) -> str | None:
    """The leader of a group for the row at ``line``, from (holds, line, row_id).

    A row that holds the group's request leads it whatever its line (the
    request's identity does not depend on row order or on the run that sent
    it); otherwise the first row above ``line``. Never the row itself.
    """
    eligible = [(not holds, ln, rid) for holds, ln, rid in candidates
                if rid != row_id and (holds or ln < line)]
    return min(eligible)[2] if eligible else None


def choose_leader(members: Iterable[LedgerRow], row_id: str) -> LedgerRow | None:
    """The leader for row ``row_id`` among its group's rows still in the job.

    The rule of :func:`first_earlier` over rows that :func:`may_lead`,
    without the line bound: here the whole manifest has been read, or the row
    has just changed its request and joins the group as it is.
    """
    eligible = [(not holds_request(r), r.line, r.row_id, r) for r in members
                if r.row_id != row_id and may_lead(r) and not r.retired]
    return min(eligible, key=lambda e: e[:3])[3] if eligible else None


# -- the shared pace ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaceState:
    """The shared pace of a job's requests, as the ledger keeps it (ledger times)."""

    next_at: float = 0.0  # the earliest time of the next free slot
    max_rate: float | None = None  # the job's configured rate; None until given
    rate: float | None = None  # the rate in force at rate_at
    rate_at: float = 0.0
    paused_until: float = 0.0  # no slot before this (a 429's pause)
    last_cut: float = 0.0  # when a 429 last halved the rate


def slot_spacing(rate: float, margin: float) -> float:
    """Seconds between slots, so that no 1 s window holds more than ``rate``.

    ``n`` slots spaced ``(1 + margin) / n`` apart span more than a second
    from first to ``n + 1``-th, so at most ``n`` fit in one; ``n`` is the
    rate rounded down (a window holds whole requests), or the rate itself
    below one request a second. ``margin`` leaves room for what happens
    between a slot and the server's clock.
    """
    return (1 + margin) / (rate if rate < 1 else math.floor(rate + 1e-9))


def pace_floor(max_rate: float) -> float:
    """The lowest rate a 429 cuts to (as RateGate's default ``min_rate``)."""
    return max(max_rate / 50, min(1.0, max_rate))


def check_claim(
    count: int, lead: float, margin: float, rate: float | None, pause: float | None
) -> None:
    """LedgerError for arguments of a pace claim that mean nothing."""
    if count < 0 or not lead >= 0 or not margin >= 0:
        raise LedgerError(f"bad pace claim: count {count}, lead {lead}, margin {margin}")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise LedgerError(f"the pace's rate must be a positive number, not {rate!r}")
    if pause is not None and not (pause >= 0 and math.isfinite(pause)):
        raise LedgerError(f"a pause must be a number of seconds, not {pause!r}")


def claim_slots(
    state: PaceState,
    now: float,
    *,
    count: int,
    lead: float,
    margin: float,
    rate: float | None = None,
    pause: float | None = None,
) -> tuple[PaceState, PaceClaim]:
    """One claim on the shared pace at ledger time ``now``: the new state and the block.

    See :meth:`batcher.ledger.base.LeasingLedger.claim_slots` for what the
    arguments mean.
    """
    check_claim(count, lead, margin, rate, pause)
    top = rate if rate is not None else state.max_rate
    if top is None:
        raise LedgerError("the shared pace has no rate yet: the first claim must give one")
    if state.rate is None or state.max_rate is None:
        current = top
    else:
        # Additive recovery: a twentieth of the ceiling per second since the
        # rate was last set, counted from the end of the last pause.
        grown = state.max_rate / 20 * max(0.0, now - max(state.rate_at, state.paused_until))
        current = min(state.max_rate, state.rate + grown)
        if rate is not None:  # a new ceiling, as RateGate.set_rate takes one
            current = min(current, rate) if current < state.max_rate else rate
    cut = pause is not None and now >= state.paused_until and now >= state.last_cut + 1
    if cut:
        current = max(pace_floor(top), current / 2)
    paused_until = state.paused_until if pause is None else max(state.paused_until, now + pause)
    spacing = slot_spacing(current, margin)
    first_at = max(state.next_at, now + lead, paused_until)
    new = replace(
        state,
        next_at=first_at + count * spacing,
        max_rate=top,
        rate=current,
        rate_at=now,
        paused_until=paused_until,
        last_cut=now if cut else state.last_cut,
    )
    claim = PaceClaim(first_at, spacing, count, now, current, top, paused_until)
    return new, claim

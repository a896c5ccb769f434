"""The ledger's decisions that need no database, shared by every backend.

* :func:`check_move`: whether a transition may be tried at all (a legal move,
  the caller's row, known update fields), before anything is written;
* :func:`refusal`: what a compare-and-set that matched nothing means, from
  the row as it is now;
* :func:`import_refresh`: what an import does to a row the ledger already
  holds;
* :func:`first_earlier`: which row of a group leads it.

Backends apply these decisions in their own storage: SQL statements or dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from batcher.errors import LedgerError, TransitionConflict
from batcher.ledger.codec import DELTAS
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
    "INVALID_ROW",
    "Move",
    "Refresh",
    "check_move",
    "first_earlier",
    "import_refresh",
    "refusal",
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


def check_move(
    row_id: str,
    expect: Stage | frozenset[Stage],
    to: Stage,
    update: Update,
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
    unknown = set(update) - UPDATE_COLUMNS - DELTAS
    if unknown:
        raise LedgerError(f"unknown update fields: {sorted(unknown)}")
    if current is None and to in allowed:
        raise LedgerError(
            f"row {row_id}: a move that may stay in {to} needs the caller's row (current=)"
        )
    return Move(row_id, expected, allowed, to, None if current is None else current.version)


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


def first_earlier(candidates: Iterable[tuple[int, str]], line: int, row_id: str) -> str | None:
    """The leader of a group for the row at ``line``: the first (line, row_id)
    of ``candidates`` above that line, other than the row itself."""
    earlier = [c for c in candidates if c[0] < line and c[1] != row_id]
    return min(earlier)[1] if earlier else None

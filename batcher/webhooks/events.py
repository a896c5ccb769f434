"""Generation events: what a verified delivery says, and which event is newer.

The API posts one event when a generation's status changes::

    {"eventType": "generation.completed", "eventId": "evt_123",
     "createdAt": "2026-01-28T12:34:56Z", "apiKeyId": "key_123",
     "apiProjectId": "proj_123", "generationId": "gen_123", "status": "complete",
     "hasVideo": false, "modelKey": "diffio-2", "error": null, "errorDetails": null}

Events use ``error`` where progress answers say ``failed``;
:attr:`GenerationEvent.api_status` translates, so a row moves on exactly as a
poll answer would move it.

Deliveries are neither ordered nor unique: the sender retries, and its
retries race each other. Whether an event changes anything is therefore a
pure decision (:func:`supersedes`, :func:`advances`): a generation's status
only moves forward (queued, processing, then one terminal status that never
changes), so an event that is not ahead of what is known is stale and
changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import orjson

from batcher.errors import EventError

__all__ = [
    "EventStatus",
    "EventType",
    "GenerationEvent",
    "advances",
    "format_time",
    "status_rank",
    "supersedes",
]


class EventType(StrEnum):
    """The four generation event types."""

    QUEUED = "generation.queued"
    PROCESSING = "generation.processing"
    FAILED = "generation.failed"
    COMPLETED = "generation.completed"


class EventStatus(StrEnum):
    """A generation's status as events spell it (``error``, not ``failed``)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    ERROR = "error"
    COMPLETE = "complete"


#: The status each event type carries; a body where they disagree is refused.
STATUS_OF: dict[EventType, EventStatus] = {
    EventType.QUEUED: EventStatus.QUEUED,
    EventType.PROCESSING: EventStatus.PROCESSING,
    EventType.FAILED: EventStatus.ERROR,
    EventType.COMPLETED: EventStatus.COMPLETE,
}
TYPE_OF: dict[EventStatus, EventType] = {status: kind for kind, status in STATUS_OF.items()}

# Progress answers' vocabulary for the same statuses.
_API_STATUS = {
    EventStatus.QUEUED: "queued",
    EventStatus.PROCESSING: "processing",
    EventStatus.ERROR: "failed",
    EventStatus.COMPLETE: "complete",
}
# How far along a status is; both vocabularies. Terminal statuses share the top rank.
_RANK = {"queued": 0, "pending": 0, "processing": 1, "complete": 2, "failed": 2, "error": 2}
TERMINAL_RANK = 2


def status_rank(status: str) -> int:
    """How far along ``status`` is: 0 queued/pending, 1 processing, 2 terminal; -1 unknown.

    Takes the event vocabulary (``error``) and the progress one (``failed``).
    """
    return _RANK.get(status, -1)


def format_time(moment: datetime) -> str:
    """UTC ISO-8601 with ``Z``; milliseconds only when there are any."""
    utc = moment.astimezone(UTC)
    if utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """One generation event, parsed and checked; a fact about one generation."""

    event_type: EventType
    event_id: str
    created_at: datetime  # timezone-aware, UTC
    api_key_id: str
    generation_id: str
    status: EventStatus
    api_project_id: str | None = None
    has_video: bool | None = None
    model_key: str | None = None
    error: str | None = None
    error_details: str | None = None

    def __post_init__(self) -> None:
        if STATUS_OF[self.event_type] is not self.status:
            raise EventError(
                f"eventType {self.event_type.value} does not go with status {self.status.value}",
                field="status")
        if self.created_at.tzinfo is None:
            raise EventError("createdAt must carry a time zone", field="createdAt")

    @classmethod
    def from_json(cls, body: bytes | str) -> GenerationEvent:
        """Parse a delivery's body; :class:`EventError` names what is wrong."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise EventError("the body is not JSON") from None
        if not isinstance(data, dict):
            raise EventError("the body is not a JSON object")
        return cls.from_payload(data)

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> GenerationEvent:
        """Build from the decoded JSON object; unknown fields are ignored.

        Required, as the official SDK requires them: eventType, eventId,
        createdAt, apiKeyId, generationId, status.
        """
        kind = _enum(EventType, data, "eventType")
        status = _enum(EventStatus, data, "status")
        has_video = data.get("hasVideo")
        if has_video is not None and not isinstance(has_video, bool):
            raise EventError("hasVideo must be true, false or null", field="hasVideo")
        return cls(
            event_type=kind,
            event_id=_required(data, "eventId"),
            created_at=_time(data, "createdAt"),
            api_key_id=_required(data, "apiKeyId"),
            generation_id=_required(data, "generationId"),
            status=status,
            api_project_id=_optional(data, "apiProjectId"),
            has_video=has_video,
            model_key=_optional(data, "modelKey"),
            error=_text(data, "error"),
            error_details=_text(data, "errorDetails"),
        )

    def to_payload(self) -> dict[str, Any]:
        """The event as the API writes it (camelCase JSON fields)."""
        return {
            "eventType": self.event_type.value,
            "eventId": self.event_id,
            "createdAt": format_time(self.created_at),
            "apiKeyId": self.api_key_id,
            "apiProjectId": self.api_project_id,
            "generationId": self.generation_id,
            "status": self.status.value,
            "hasVideo": self.has_video,
            "modelKey": self.model_key,
            "error": self.error,
            "errorDetails": self.error_details,
        }

    def to_json(self) -> bytes:
        """:meth:`to_payload` as compact JSON bytes."""
        return orjson.dumps(self.to_payload())

    @property
    def terminal(self) -> bool:
        """True for ``complete`` and ``error``: the generation will not change again."""
        return status_rank(self.status) == TERMINAL_RANK

    @property
    def api_status(self) -> str:
        """The status in the progress answers' words: ``failed`` for ``error``."""
        return _API_STATUS[self.status]


def supersedes(new: GenerationEvent, old: GenerationEvent | None) -> bool:
    """Whether ``new`` is newer news about a generation than ``old``.

    A terminal event is final; otherwise the further status wins, and between
    equal statuses the later ``createdAt``. An event that does not supersede
    the last one recorded is stale: recording it must change nothing.
    """
    if old is None:
        return True
    if old.terminal:
        return False
    new_rank, old_rank = status_rank(new.status), status_rank(old.status)
    if new_rank != old_rank:
        return new_rank > old_rank
    return new.created_at > old.created_at


def advances(event: GenerationEvent, api_status: str | None) -> bool:
    """Whether ``event`` moves a generation whose known status is ``api_status``.

    For a store that keeps only a status (from a poll or an event, in either
    vocabulary), not the last event: the event must be strictly further
    along, and nothing moves a terminal status.
    """
    if api_status is None:
        return True
    known = status_rank(api_status)
    return known != TERMINAL_RANK and status_rank(event.status) > known


# -- field readers ----------------------------------------------------------

_E = TypeVar("_E", bound=StrEnum)


def _enum(kind: type[_E], data: Mapping[str, Any], name: str) -> _E:
    value = data.get(name)
    if value is None:
        raise EventError(f"{name} is missing", field=name)
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(member.value for member in kind)
        raise EventError(f"{name} {str(value)[:60]!r} is not one of {known}", field=name) from None


def _required(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise EventError(f"{name} must be a non-empty string", field=name)
    return value


def _optional(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventError(f"{name} must be a string or null", field=name)
    return value


def _text(data: Mapping[str, Any], name: str) -> str | None:
    # Error texts are for people: keep a non-string (an object of details) as JSON text
    # rather than refuse an event that reports a real failure.
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _time(data: Mapping[str, Any], name: str) -> datetime:
    value = _required(data, name)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise EventError(f"{name} {value[:40]!r} is not an ISO-8601 time", field=name) from None
    # A time without a zone is read as UTC, as the API writes every time in UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

"""The Diffio API's answers, typed: what each endpoint returns and how it is read.

:class:`GenerationStatus` is the one meaning of the API's status words; the
dataclasses are the answers :class:`~batcher.client.DiffioClient` returns.
The checks below read a 200 answer's JSON: a field the answer must hold and
does not (or holds in the wrong form) is a :class:`~batcher.errors.DecodeError`
with the endpoint and the start of the answer, never a crash further on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NoReturn
from urllib.parse import urlsplit

import orjson

from batcher.errors import DecodeError
from batcher.model import UploadSession

__all__ = [
    "DownloadInfo",
    "GenerationAccepted",
    "GenerationStatus",
    "Progress",
    "ProjectCreated",
    "UploadConfirmed",
    "bad_answer",
    "is_http_url",
    "is_number",
    "optional_str",
    "queue_position",
    "required_str",
    "upload_session",
]


class GenerationStatus(Enum):
    """What the API's status word for a generation means to the runner."""

    # queued, pending, processing, running, uploading: not finished yet.
    RUNNING = "running"
    # complete, completed, succeeded: the output can be downloaded.
    COMPLETE = "complete"
    # failed, error, cancelled, canceled: it replays as failed forever.
    FAILED = "failed"
    # A word batcher does not know: polled again, a bounded number of times.
    UNKNOWN = "unknown"

    @classmethod
    def of(cls, word: str | None) -> GenerationStatus:
        """The status a word (any case; None counts as unknown) stands for."""
        return _STATUS_WORDS.get((word or "").lower(), cls.UNKNOWN)


_STATUS_WORDS: Mapping[str, GenerationStatus] = {
    **dict.fromkeys(("queued", "pending", "processing", "running", "uploading"),
                    GenerationStatus.RUNNING),
    **dict.fromkeys(("complete", "completed", "succeeded"), GenerationStatus.COMPLETE),
    **dict.fromkeys(("failed", "error", "cancelled", "canceled"), GenerationStatus.FAILED),
}


@dataclass(frozen=True, slots=True)
class ProjectCreated:
    """Answer of ``create_project``: where and how to upload the file.

    Exactly one of ``upload`` (today's API: an upload session, the file goes
    up in parts) and ``upload_url`` (the seed era: one PUT) is set.
    """

    api_project_id: str
    upload_url: str | None
    upload_method: str
    object_path: str | None
    bucket: str | None
    expires_at: str | None
    upload: UploadSession | None = None


@dataclass(frozen=True, slots=True)
class UploadConfirmed:
    """Answer of ``complete_project_upload``: the project's file is in place."""

    api_project_id: str
    status: str
    size_bytes: int | None


@dataclass(frozen=True, slots=True)
class GenerationAccepted:
    """Answer of ``{model}-generation``; ``replay`` is ``idempotentReplay``.

    ``api_status`` is the status word as sent, ``status`` what it means.
    """

    generation_id: str
    api_project_id: str
    model_key: str | None
    status: GenerationStatus
    api_status: str
    replay: bool
    # Halfway between sending the request and its answer arriving (the
    # client's clock): when the API most likely accepted it, if known.
    accepted_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Progress:
    """Answer of ``get_generation_progress``.

    ``api_status`` is the overall status word as sent, ``status`` what it
    means; ``progress`` is the inference stage's percentage. Today's API may
    add ``stage`` (the stage under way), ``stage_progress`` (percent per
    stage) and ``queue`` (``queue_position``, 1 being next, and a message).
    """

    generation_id: str
    api_project_id: str | None
    status: GenerationStatus
    api_status: str
    progress: int | None
    error: str | None
    error_details: str | None
    stage: str | None = None
    stage_progress: Mapping[str, int] | None = None
    queue_position: int | None = None
    queue_message: str | None = None
    # Halfway between sending the request and its answer arriving (the
    # client's clock), when the answer was most likely made, if known.
    read_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class DownloadInfo:
    """Answer of ``get_generation_download``: a signed URL, valid ~2 hours."""

    download_url: str
    file_name: str | None
    mime_type: str | None
    storage_path: str | None
    download_type: str | None
    bucket: str | None


def is_http_url(value: str) -> bool:
    """Whether ``value`` is an absolute http(s) URL."""
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def upload_session(data: Mapping[str, Any], endpoint: str) -> UploadSession:
    """The ``upload`` object of create_project, checked as the SDK reads it."""
    edge = required_str(data, "edgeBaseUrl", endpoint)
    if not is_http_url(edge):
        bad_answer(endpoint, data, f"edgeBaseUrl is not an http(s) URL: {edge[:100]!r}")
    part_size = data.get("partSizeBytes")
    if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size <= 0:
        bad_answer(endpoint, data, "upload.partSizeBytes is not a positive whole number")
    max_bytes = data.get("maxBytes")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        max_bytes = None
    return UploadSession(
        session_id=optional_str(data, "uploadSessionId") or "",
        edge_base_url=edge.rstrip("/"),
        token=required_str(data, "uploadToken", endpoint),
        part_size=part_size,
        max_bytes=max_bytes,
        expires_at=optional_str(data, "expiresAt"),
    )


def is_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number (a bool is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def queue_position(value: Any) -> int | None:
    """A queue position of 1 or more (0 or nothing: not waiting in a queue)."""
    if not is_number(value) or value < 1:
        return None
    return int(value)


def required_str(obj: Mapping[str, Any], key: str, endpoint: str) -> str:
    """``obj[key]`` as a non-empty string, else a :class:`DecodeError`."""
    value = obj.get(key)
    if isinstance(value, str) and value:
        return value
    bad_answer(endpoint, obj, f"answer lacks a string {key!r}")


def optional_str(obj: Mapping[str, Any], key: str) -> str | None:
    """``obj[key]`` if it is a string, else None."""
    value = obj.get(key)
    return value if isinstance(value, str) else None


def bad_answer(endpoint: str, obj: Mapping[str, Any], problem: str) -> NoReturn:
    """Raise the :class:`DecodeError` of a 200 answer that lacks what it must hold."""
    shown = orjson.dumps(obj)[:200].decode("utf-8", errors="replace")
    raise DecodeError(f"HTTP 200 {problem}: {shown}", status=200, body=shown, endpoint=endpoint)

"""Upload sessions and multipart uploads of the current API, free of HTTP.

``create_project`` opens an :class:`UploadSession` (its token is the only
credential the upload host takes); on the upload host a client starts a
:class:`MultipartUpload`, puts numbered parts, then completes it with the
list of (partNumber, etag) it was given. The rules, as the upload host keeps
them:

- parts are numbered from 1 to :data:`MAX_PARTS`; a part is at most the
  upload's part size, and no byte may lie beyond the session's ``maxBytes``;
- a part number may be put again: the newer bytes replace the older;
- completing needs every part from 1 to N exactly once with the etag its
  put answered; every part but the last is exactly the part size; only an
  empty file's single part may be empty;
- a completed upload answers the same completion again (a client whose
  answer was lost retries it); an aborted one is gone.

Every refusal is an :class:`EdgeRefusal`, answered as
``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_PARTS",
    "EdgeRefusal",
    "MultipartUpload",
    "Part",
    "UploadBook",
    "UploadSession",
    "etag_of",
    "parse_receipts",
]

MAX_PARTS = 10_000


class EdgeRefusal(Exception):
    """An upload host error answer: HTTP status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def body(self) -> dict[str, Any]:
        """The JSON body, in the upload host's shape."""
        return {"error": {"code": self.code, "message": self.message}}


def etag_of(data: bytes) -> str:
    """The etag the upload host answers for a part: the MD5 hex of its bytes."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Part:
    """One stored part."""

    etag: str
    data: bytes


@dataclass
class UploadSession:
    """What create_project hands out for one project's upload."""

    session_id: str
    token: str = field(repr=False)
    api_project_id: str
    object_key: str
    part_size: int
    max_bytes: int
    created_wall: float

    def expires_wall(self, ttl: float) -> float:
        """When it expires under a session lifetime of ``ttl`` seconds."""
        return self.created_wall + ttl


@dataclass
class MultipartUpload:
    """One started upload of a session: its parts and where it stands."""

    upload_id: str
    session: UploadSession
    part_size: int
    parts: dict[int, Part] = field(default_factory=dict)
    status: str = "open"  # open | completed | aborted
    # Once completed: the receipts that completed it (to answer a repeat) and
    # the object's size and etag. The parts themselves are dropped then, so
    # a large file is not held twice.
    receipts: list[tuple[int, str]] | None = None
    size: int = 0
    etag: str = ""

    def check_part(self, number: int, length: int) -> None:
        """Refuse a part before its bytes are read: number, size, upload limit."""
        self._check_open()
        if not 1 <= number <= MAX_PARTS:
            raise EdgeRefusal(400, "bad_request",
                              f"part numbers run from 1 to {MAX_PARTS}, got {number}")
        if length > self.part_size:
            raise EdgeRefusal(413, "payload_too_large",
                              f"part {number} is {length} bytes; parts are at most "
                              f"{self.part_size} bytes")
        if (number - 1) * self.part_size + length > self.session.max_bytes:
            raise EdgeRefusal(413, "upload_too_large",
                              f"part {number} reaches past the upload limit of "
                              f"{self.session.max_bytes} bytes")

    def put_part(self, number: int, data: bytes) -> tuple[str, bool]:
        """Store a part; returns its etag and whether that number was stored before."""
        self.check_part(number, len(data))
        again = number in self.parts
        part = Part(etag_of(data), data)
        self.parts[number] = part
        return part.etag, again

    def complete(self, receipts: Any) -> bytes | None:
        """Assemble the object from ``receipts`` and return it; None for a repeat.

        A repeat (the same receipts again, as after a lost answer) changes
        nothing; ``size`` and ``etag`` describe the object either way.
        """
        listed = parse_receipts(receipts)
        if self.status == "completed":
            if listed != self.receipts:
                raise EdgeRefusal(409, "upload_completed",
                                  "this upload was already completed with other parts")
            return None
        self._check_open()
        data = self._assemble(listed)
        self.status, self.receipts = "completed", listed
        self.size, self.etag = len(data), etag_of(data)
        self.parts.clear()
        return data

    def abort(self) -> None:
        """Drop the parts; the upload id is gone afterwards."""
        if self.status == "completed":
            raise EdgeRefusal(409, "upload_completed",
                              "this upload is completed; there is nothing to abort")
        self.status = "aborted"
        self.parts.clear()

    def _check_open(self) -> None:
        if self.status == "aborted":
            raise EdgeRefusal(404, "no_such_upload", "this upload was aborted")
        if self.status == "completed":
            raise EdgeRefusal(409, "upload_completed", "this upload is already completed")

    def _assemble(self, listed: list[tuple[int, str]]) -> bytes:
        numbers = [number for number, _ in listed]
        if numbers != list(range(1, len(listed) + 1)):
            missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
            raise EdgeRefusal(400, "invalid_part_order",
                              f"parts must run 1..N without gaps; missing {missing[:5]}")
        chunks = []
        for number, etag in listed:
            part = self.parts.get(number)
            if part is None or part.etag != etag:
                raise EdgeRefusal(400, "invalid_part",
                                  f"part {number} was not stored with etag {etag!r}")
            last = number == len(listed)
            if not last and len(part.data) != self.part_size:
                raise EdgeRefusal(400, "invalid_part_size",
                                  f"part {number} is {len(part.data)} bytes; every part but "
                                  f"the last must be {self.part_size} bytes")
            if last and not part.data and number > 1:
                raise EdgeRefusal(400, "invalid_part_size",
                                  "only an empty file's single part may be empty")
            chunks.append(part.data)
        data = b"".join(chunks)
        if len(data) > self.session.max_bytes:
            raise EdgeRefusal(413, "upload_too_large",
                              f"the upload is {len(data)} bytes; the limit is "
                              f"{self.session.max_bytes} bytes")
        return data


def parse_receipts(receipts: Any) -> list[tuple[int, str]]:
    """``[{"partNumber", "etag"}, ...]`` as (number, etag) pairs in part order."""
    if not isinstance(receipts, list) or not receipts:
        raise EdgeRefusal(400, "bad_request", "parts must be a non-empty list")
    listed: dict[int, str] = {}
    for item in receipts:
        number = item.get("partNumber") if isinstance(item, dict) else None
        etag = item.get("etag") if isinstance(item, dict) else None
        if isinstance(number, bool) or not isinstance(number, int) or not isinstance(etag, str):
            raise EdgeRefusal(400, "bad_request",
                              "each part must be {\"partNumber\": int, \"etag\": string}")
        if number in listed:
            raise EdgeRefusal(400, "bad_request", f"part {number} is listed twice")
        listed[number] = etag
    return sorted(listed.items())


class UploadBook:
    """Every upload session and multipart upload, by token and by id."""

    def __init__(self) -> None:
        self.sessions: dict[str, UploadSession] = {}  # token -> session
        self.uploads: dict[str, MultipartUpload] = {}

    def __repr__(self) -> str:
        return f"UploadBook(sessions={len(self.sessions)}, uploads={len(self.uploads)})"

    def open_session(self, session: UploadSession) -> UploadSession:
        """Register a session handed out by create_project."""
        self.sessions[session.token] = session
        return session

    def session_for(self, token: str) -> UploadSession | None:
        """The session ``token`` opens, or None."""
        return self.sessions.get(token)

    def start(self, upload_id: str, session: UploadSession, part_size: int) -> MultipartUpload:
        """A new multipart upload of ``session`` with parts of ``part_size`` bytes."""
        upload = MultipartUpload(upload_id, session, part_size)
        self.uploads[upload_id] = upload
        return upload

    def upload_of(self, session: UploadSession, upload_id: Any) -> MultipartUpload:
        """The session's upload ``upload_id``; 404 when unknown, 403 when another session's."""
        upload = self.uploads.get(upload_id) if isinstance(upload_id, str) else None
        if upload is None:
            raise EdgeRefusal(404, "no_such_upload", "no upload has this uploadId")
        if upload.session is not session:
            raise EdgeRefusal(403, "forbidden",
                              "this upload token belongs to another upload session")
        return upload


"""Where file bytes go: the upload host, signed URLs, and what every HTTP exchange shares.

File bytes never go to the API. Today's API takes a file up in parts on its
upload host (``{edgeBaseUrl}/v1/uploads/start``, ``parts/{n}``, ``complete``,
``abort``), authorized by the upload session's token; the seed-era API took
it in one PUT to a signed URL. Outputs come down from signed download URLs.
:class:`Storage` does all of that, and none of it ever carries the API key:
this module is never given it (the upload host takes the session's token,
signed URLs take nothing). None of it passes the API's rate gate; every
exchange holds the run's concurrency cap, and every chunk of file bytes, up
or down, is taken from the run's byte budget (``--max-bandwidth``) first.

Bytes going up are streamed from disk in chunks with an explicit
``Content-Length``: never a whole file, nor a whole part, in memory. Every
chunk sent is fed to the caller's digests, so the caller knows the sha256 of
the bytes that actually left, not of what the file held when it was keyed.

File bytes go through aiohttp, which streams them; this module is imported
(and aiohttp with it) only when a run first moves a file. What it shares
with the API client (the connections, the cap, the timeout, the report of
each exchange, the translation of failures) is
:class:`~batcher.transport.Transport`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol
from urllib.parse import quote

import aiohttp
import anyio
import orjson
from aiohttp import http_exceptions

from batcher.bandwidth import Bandwidth
from batcher.classify import error_text, parse_retry_after
from batcher.errors import (
    BatcherError,
    ClientError,
    Conflict,
    DecodeError,
    LocalFileError,
    RateLimited,
    ServerError,
    StatusError,
    UrlExpired,
)
from batcher.model import UploadPart, UploadSession
from batcher.transport import Transport, judge_answer
from batcher.version import USER_AGENT

__all__ = [
    "TRANSPORT_EXCEPTIONS",
    "Digest",
    "Storage",
    "UploadStarted",
    "check_file_size",
]

# File bytes move in chunks this large: every transfer in flight holds about
# one chunk being read and one being written, whatever the file's size.
_UPLOAD_CHUNK = 256 * 1024
_DOWNLOAD_CHUNK = 256 * 1024
# Floor on upload throughput used to size an upload's total timeout: a
# stalled upload must end, but a large one on a slow link must not. Under a
# bandwidth cap the floor is a share of the cap, as transfers share it.
_MIN_UPLOAD_BYTES_PER_S = 64 * 1024
_CAP_SHARE = 32
_ERROR_BODY_LIMIT = 4096

# Everything the HTTP layer may raise for a failed exchange. aiohttp's
# exceptions cover connect, reset, payload and (ServerTimeoutError) timeouts;
# a total timeout surfaces as the builtin TimeoutError; some OS errors and
# HTTP parser errors can escape unwrapped.
TRANSPORT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    http_exceptions.HttpProcessingError,
    TimeoutError,
    OSError,
)


class Digest(Protocol):
    """What is fed the bytes sent: a ``hashlib`` object, for one."""

    def update(self, data: bytes, /) -> None: ...


@dataclass(frozen=True, slots=True)
class UploadStarted:
    """The upload host's answer to ``start``: the upload id and its part size."""

    upload_id: str
    part_size: int


class Storage:
    """File bytes up and down, off the API: no API key, no rate gate.

    ``bandwidth`` is the run's byte budget, shared by every transfer (None:
    no cap).
    """

    __slots__ = ("_bandwidth", "_transport")

    def __init__(self, transport: Transport, bandwidth: Bandwidth | None = None) -> None:
        self._transport = transport
        self._bandwidth = bandwidth

    def __repr__(self) -> str:
        return f"Storage(bandwidth={self._bandwidth!r})"

    # -- one PUT to a signed URL (the seed-era API) ----------------------------

    async def upload(
        self, *, url: str, method: str, path: Path, content_type: str, size: int,
        digests: Sequence[Digest] = (),
    ) -> None:
        """Send the file at ``path`` to a signed upload URL, streamed from disk.

        ``size`` is the size the project was created with; a file of another
        size now raises :class:`LocalFileError` (``fileChanged``) before
        anything is sent. Every byte sent is fed to ``digests``.
        """
        await check_file_size(path, size)
        headers = {"Content-Type": content_type, "Content-Length": str(size),
                   "User-Agent": USER_AGENT}
        status, resp_headers, body = await self._send(
            "upload", method.upper() or "PUT", url, headers=headers,
            data=_file_chunks(path, 0, size, digests, self._bandwidth),
            limits=self._transfer_timeout(size))
        if not 200 <= status < 300:
            raise _storage_error(status, resp_headers, body, "upload")

    # -- uploads in parts (the current API's upload host) ----------------------

    async def start_upload(self, session: UploadSession) -> UploadStarted:
        """``POST {edge}/v1/uploads/start``: a new multipart upload in ``session``.

        The answer's ``partSizeBytes``, when it has one, overrides the session's.
        """
        endpoint = "upload:start"
        obj = await self._edge_json(session, endpoint, "start", {})
        upload_id = obj.get("uploadId")
        if not isinstance(upload_id, str) or not upload_id:
            _bad_answer(endpoint, obj, "answer lacks a string 'uploadId'")
        size = obj.get("partSizeBytes")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            size = session.part_size
        return UploadStarted(upload_id, size)

    async def put_part(
        self, session: UploadSession, upload_id: str, number: int, *, path: Path,
        offset: int, length: int, digests: Sequence[Digest] = (),
    ) -> str:
        """``PUT {edge}/v1/uploads/parts/{number}``: bytes ``offset..offset+length``
        of ``path``, streamed; returns the part's etag.

        Every byte sent is fed to ``digests``. A file that ends before
        ``offset + length`` raises :class:`LocalFileError` (``fileChanged``).
        """
        endpoint = "upload:part"
        headers = {**_edge_headers(session), "Content-Type": "application/octet-stream",
                   "Content-Length": str(length)}
        url = f"{_edge_url(session, f'parts/{number}')}?uploadId={quote(upload_id, safe='')}"
        status, resp_headers, body = await self._send(
            endpoint, "PUT", url, headers=headers,
            data=_file_chunks(path, offset, length, digests, self._bandwidth),
            limits=self._transfer_timeout(length), read_body=True)
        if not 200 <= status < 300:
            raise _upload_host_error(status, resp_headers, body, endpoint)
        obj = _json_object(body, endpoint, status)
        etag = obj.get("etag")
        if not isinstance(etag, str) or not etag:
            _bad_answer(endpoint, obj, f"part {number}: answer lacks a string 'etag'")
        return etag

    async def complete_upload(
        self, session: UploadSession, upload_id: str, parts: Sequence[UploadPart]
    ) -> None:
        """``POST {edge}/v1/uploads/complete`` with every part's number and etag.

        Completing again with the same parts is answered as the first time.
        """
        receipts = [{"partNumber": p.number, "etag": p.etag} for p in parts]
        await self._edge_json(session, "upload:complete", "complete",
                              {"uploadId": upload_id, "parts": receipts})

    async def abort_upload(self, session: UploadSession, upload_id: str) -> None:
        """``POST {edge}/v1/uploads/abort``: the host drops the upload's parts."""
        await self._edge_json(session, "upload:abort", "abort", {"uploadId": upload_id})

    async def _edge_json(
        self, session: UploadSession, endpoint: str, action: str, payload: Mapping[str, Any]
    ) -> dict[str, Any]:
        headers = {**_edge_headers(session), "Content-Type": "application/json",
                   "Accept": "application/json"}
        status, resp_headers, body = await self._send(
            endpoint, "POST", _edge_url(session, action), headers=headers,
            data=orjson.dumps(payload), limits=aiohttp.ClientTimeout(
                total=self._transport.timeout), read_body=True)
        if not 200 <= status < 300:
            raise _upload_host_error(status, resp_headers, body, endpoint)
        return _json_object(body, endpoint, status) if body.strip() else {}

    # -- downloads -------------------------------------------------------------

    async def download(self, *, url: str, write: Callable[[bytes], Awaitable[None]]) -> None:
        """GET a signed URL and hand its body to ``write``, chunk by chunk.

        The concurrency cap is held until the body is read; each chunk is
        taken from the byte budget as it comes in. A refused URL or a failed
        transfer raises an ``ApiError``. ``write`` raises batcher errors only
        (see :func:`batcher.outputs.fetch_to_file`); they pass through untouched.
        """
        endpoint = "download"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._transport.timeout, sock_read=self._transport.timeout
        )
        bandwidth = self._bandwidth
        async with self._transport.cap, self._transport.guarded(url, url) as verdict:
            start = self._transport.clock.now()
            status: int | None = None
            try:
                async with self._transport.http.files.get(
                    url, timeout=timeout, headers={"User-Agent": USER_AGENT}
                ) as resp:
                    status = resp.status
                    judge_answer(verdict, status)
                    if not 200 <= status < 300:
                        body = await resp.content.read(_ERROR_BODY_LIMIT)
                        raise _storage_error(status, resp.headers, body, endpoint)
                    async for chunk in resp.content.iter_chunked(_DOWNLOAD_CHUNK):
                        if bandwidth is not None:
                            await bandwidth.take(len(chunk))
                        await write(chunk)
            except TRANSPORT_EXCEPTIONS as exc:
                verdict.unreachable()
                self._transport.report(endpoint, None, start)
                raise self._transport.error(exc, endpoint) from exc
            except BatcherError:
                self._transport.report(endpoint, status, start)
                raise
            self._transport.report(endpoint, status, start)

    # -- plumbing ----------------------------------------------------------------

    def _transfer_timeout(self, size: int) -> aiohttp.ClientTimeout:
        floor = float(_MIN_UPLOAD_BYTES_PER_S)
        if self._bandwidth is not None and self._bandwidth.bytes_per_second is not None:
            floor = min(floor, self._bandwidth.bytes_per_second / _CAP_SHARE)
        return aiohttp.ClientTimeout(
            total=self._transport.timeout + size / floor,
            sock_connect=self._transport.timeout,
            sock_read=self._transport.timeout,
        )

    async def _send(
        self, endpoint: str, method: str, url: str, *, headers: Mapping[str, str], data: Any,
        limits: aiohttp.ClientTimeout, read_body: bool = False,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One exchange under the cap; the body is read when asked or on an error.

        A batcher error raised while the body was being sent (the file
        changed or could not be read) comes out as itself, not as the
        connection error aiohttp wraps it in.
        """
        transport = self._transport
        async with transport.cap, transport.guarded(url, (method, url)) as verdict:
            start = transport.clock.now()
            try:
                async with transport.http.files.request(
                    method, url, data=data, headers=headers, timeout=limits,
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    judge_answer(verdict, status)
                    body = b""
                    if not 200 <= status < 300:
                        body = await resp.content.read(_ERROR_BODY_LIMIT)
                    elif read_body:
                        body = await resp.read()
                    resp_headers = resp.headers
            except TRANSPORT_EXCEPTIONS as exc:
                transport.report(endpoint, None, start)
                cause = exc.__cause__
                if isinstance(cause, BatcherError):
                    raise cause from None
                verdict.unreachable()
                raise transport.error(exc, endpoint) from exc
            except BatcherError:
                transport.report(endpoint, None, start)
                raise
            transport.report(endpoint, status, start)
        return status, resp_headers, body


def _edge_headers(session: UploadSession) -> dict[str, str]:
    # The upload token is the only credential the upload host takes.
    return {"Authorization": f"Bearer {session.token}", "User-Agent": USER_AGENT}


def _edge_url(session: UploadSession, action: str) -> str:
    return f"{session.edge_base_url.rstrip('/')}/v1/uploads/{action}"


async def check_file_size(path: Path, size: int) -> None:
    """LocalFileError unless ``path`` can be read and is ``size`` bytes.

    ``fileUnreadable`` when it cannot be read, ``fileChanged`` when its size
    is not the one it had when its row was keyed.
    """
    try:
        actual = (await anyio.Path(path).stat()).st_size
    except OSError as exc:
        raise LocalFileError(f"cannot read {path}: {exc.strerror or exc}",
                             code="fileUnreadable") from exc
    if actual != size:
        raise LocalFileError(f"{path} is {actual} bytes, not the {size} it had when keyed",
                             code="fileChanged")


async def _file_chunks(
    path: Path, offset: int, length: int, digests: Sequence[Digest], bandwidth: Bandwidth | None
) -> AsyncIterator[bytes]:
    """Bytes ``offset..offset+length`` of ``path``, one chunk at a time off the loop.

    Each chunk is fed to ``digests`` and taken from ``bandwidth`` before it
    is handed on to be sent.
    """
    try:
        f = await anyio.open_file(path, "rb")
    except OSError as exc:
        raise LocalFileError(f"cannot read {path}: {exc.strerror or exc}",
                             code="fileUnreadable") from exc
    # Read into one buffer of this upload's (the worker threads allocate
    # nothing, so their malloc arenas do not grow), then copy out on the
    # loop: the transport may keep a chunk after write() returns.
    buffer = memoryview(bytearray(min(_UPLOAD_CHUNK, max(length, 1))))
    async with f:
        try:
            if offset:
                await f.seek(offset)
            left = length
            while left > 0:
                got = await f.readinto(buffer[: min(len(buffer), left)])
                if not got:
                    raise LocalFileError(f"{path} became shorter while it was being uploaded",
                                         code="fileChanged")
                data = bytes(buffer[:got])
                left -= got
                for digest in digests:
                    digest.update(data)
                if bandwidth is not None:
                    await bandwidth.take(len(data))
                yield data
        except OSError as exc:
            raise LocalFileError(f"cannot read {path}: {exc.strerror or exc}",
                                 code="fileUnreadable") from exc


def _json_object(body: bytes, endpoint: str, status: int) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        text = body[:200].decode("utf-8", errors="replace")
        raise DecodeError(f"HTTP {status} answer is not a JSON object: {text!r}",
                          status=status, body=text, endpoint=endpoint)
    return value


def _bad_answer(endpoint: str, obj: Mapping[str, Any], problem: str) -> NoReturn:
    shown = orjson.dumps(obj)[:200].decode("utf-8", errors="replace")
    raise DecodeError(f"HTTP 200 {problem}: {shown}", status=200, body=shown, endpoint=endpoint)


def _upload_host_error(
    status: int, headers: Mapping[str, str], body: bytes, endpoint: str
) -> StatusError:
    """Map a non-2xx answer of the upload host (``{"error": {"code", "message"}}``).

    401 and 403 mean the session's token is no good (expired, unknown,
    another session's): :class:`UrlExpired`, so the caller starts over on a
    fresh project. 409 (the upload is completed, or the project's upload is
    confirmed) is a :class:`Conflict`; 408, 5xx and 429 are retryable; other
    4xx are the row's :class:`ClientError`, with the host's code.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    data: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    message, code = error_text(data)
    text = body[:200].decode("utf-8", errors="replace")
    shown = f"the upload host answered HTTP {status}: {message or repr(text)}"
    kw: dict[str, Any] = {"status": status, "endpoint": endpoint, "body": data}
    if status in (401, 403):
        return UrlExpired(shown, code=code or "urlExpired", **kw)
    if status == 409:
        return Conflict(shown, code=code or "conflict", **kw)
    if status == 429:
        return RateLimited(shown, retry_after=parse_retry_after(headers.get("Retry-After")),
                           code=code or "rateLimited", **kw)
    if status == 408 or status >= 500:
        return ServerError(shown, code=code or "serverError", **kw)
    return ClientError(shown, code=code or f"http{status}", **kw)


def _storage_error(
    status: int, headers: Mapping[str, str], body: bytes, endpoint: str
) -> StatusError:
    """Map a non-2xx answer of a signed storage URL (not the API)."""
    text = body[:200].decode("utf-8", errors="replace")
    message = f"{endpoint} to signed URL failed with HTTP {status}: {text!r}"
    kw: dict[str, Any] = {"status": status, "endpoint": endpoint, "body": {"text": text}}
    if status in (401, 403, 410) or (status == 400 and "expired" in text.lower()):
        return UrlExpired(message, **kw)
    if status == 429:
        return RateLimited(message, retry_after=parse_retry_after(headers.get("Retry-After")), **kw)
    if status == 408 or status >= 500:
        return ServerError(message, **kw)
    return ClientError(message, code=f"http{status}", **kw)

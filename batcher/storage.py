"""Signed storage URLs, and what every HTTP exchange shares.

Uploads and downloads go to signed storage URLs, not to the API: they never
carry the API key and do not pass the API's rate gate, but they hold the
run's concurrency cap like every request (:class:`Storage`).

:class:`Transport` is what the API client and the storage transfers share:
the session, the concurrency cap, the timeout, the report of each exchange
(``on_request``), and the one place where aiohttp, OS and timeout
exceptions become batcher's ``ApiError``s (:meth:`Transport.error`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from aiohttp import http_exceptions

from batcher.classify import parse_retry_after
from batcher.clock import Clock
from batcher.errors import (
    ApiError,
    BatcherError,
    ClientError,
    DecodeError,
    LocalFileError,
    RateLimited,
    ServerError,
    StatusError,
    TransportError,
    UrlExpired,
    redact,
)

__all__ = ["TRANSPORT_EXCEPTIONS", "RequestCallback", "Storage", "Transport"]

RequestCallback = Callable[[str, int | None, float], None]
"""``on_request(endpoint, status or None on transport failure, seconds)``."""

_CHUNK = 1 << 20
# Floor on upload throughput used to size an upload's total timeout: a
# stalled upload must end, but a large one on a slow link must not.
_MIN_UPLOAD_BYTES_PER_S = 64 * 1024
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


@dataclass(frozen=True, slots=True, repr=False)
class Transport:
    """The HTTP plumbing shared by the API client and the storage transfers.

    ``secret`` (the API key) is only used to scrub messages.
    """

    session: aiohttp.ClientSession
    cap: anyio.CapacityLimiter
    timeout: float
    clock: Clock
    secret: str
    on_request: RequestCallback | None = None

    def __repr__(self) -> str:
        return f"Transport(timeout={self.timeout}, secret=***)"

    def report(self, endpoint: str, status: int | None, start: float) -> None:
        """One exchange ended (``status`` None: no answer); ``start`` from :attr:`clock`."""
        if self.on_request is not None:
            self.on_request(endpoint, status, self.clock.now() - start)

    def error(self, exc: BaseException, endpoint: str) -> ApiError:
        """Translate an aiohttp/OS/timeout exception into the error tree."""
        if isinstance(exc, TimeoutError):
            what = f"no answer within the timeout ({type(exc).__name__})"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            what = "the server closed the connection before answering"
        elif isinstance(exc, aiohttp.ClientPayloadError):
            what = f"the answer was cut short: {exc}"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            what = f"cannot connect: {exc}"
        elif isinstance(exc, aiohttp.InvalidURL):
            return DecodeError(f"invalid URL: {exc}", endpoint=endpoint)
        else:
            what = f"{type(exc).__name__}: {exc}"
        return TransportError(redact(what, self.secret), endpoint=endpoint)


class Storage:
    """Uploads to and downloads from signed URLs: no API key, no rate gate."""

    __slots__ = ("_transport",)

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def __repr__(self) -> str:
        return "Storage()"

    async def upload(
        self, *, url: str, method: str, path: Path, content_type: str, size: int
    ) -> None:
        """Send the file at ``path`` to a signed upload URL, streamed from disk.

        No API key is sent and the rate gate is not used. ``size`` is the
        size the project was created with; a file of another size now raises
        :class:`LocalFileError` (``fileChanged``) before anything is sent.
        """
        endpoint = "upload"
        try:
            actual = (await anyio.Path(path).stat()).st_size
        except OSError as exc:
            raise LocalFileError(
                f"cannot read {path}: {exc.strerror or exc}",
                code="fileUnreadable",
            ) from exc
        if actual != size:
            raise LocalFileError(
                f"{path} is {actual} bytes, not the {size} it had when keyed",
                code="fileChanged",
            )
        timeout = aiohttp.ClientTimeout(
            total=self._transport.timeout + size / _MIN_UPLOAD_BYTES_PER_S,
            sock_connect=self._transport.timeout,
            sock_read=self._transport.timeout,
        )
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        async with self._transport.cap:
            start = self._transport.clock.now()
            try:
                async with self._transport.session.request(
                    method.upper() or "PUT",
                    url,
                    data=_file_chunks(path, size),
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    body = b""
                    if not 200 <= status < 300:
                        body = await resp.content.read(_ERROR_BODY_LIMIT)
                    resp_headers = resp.headers
            except TRANSPORT_EXCEPTIONS as exc:
                self._transport.report(endpoint, None, start)
                raise self._transport.error(exc, endpoint) from exc
            self._transport.report(endpoint, status, start)
        if not 200 <= status < 300:
            raise _storage_error(status, resp_headers, body, endpoint)

    async def download(self, *, url: str, write: Callable[[bytes], Awaitable[None]]) -> None:
        """GET a signed URL and hand its body to ``write``, chunk by chunk.

        No API key is sent and the rate gate is not used; the concurrency cap
        is held until the body is read. A refused URL or a failed transfer
        raises an ``ApiError``. ``write`` raises batcher errors only (see
        :func:`batcher.outputs.fetch_to_file`); they pass through untouched.
        """
        endpoint = "download"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._transport.timeout, sock_read=self._transport.timeout
        )
        async with self._transport.cap:
            start = self._transport.clock.now()
            status: int | None = None
            try:
                async with self._transport.session.get(url, timeout=timeout) as resp:
                    status = resp.status
                    if not 200 <= status < 300:
                        body = await resp.content.read(_ERROR_BODY_LIMIT)
                        raise _storage_error(status, resp.headers, body, endpoint)
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        await write(chunk)
            except TRANSPORT_EXCEPTIONS as exc:
                self._transport.report(endpoint, None, start)
                raise self._transport.error(exc, endpoint) from exc
            except BatcherError:
                self._transport.report(endpoint, status, start)
                raise
            self._transport.report(endpoint, status, start)


async def _file_chunks(path: Path, size: int) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of ``path``, one chunk at a time off the loop."""
    async with await anyio.open_file(path, "rb") as f:
        left = size
        while left > 0:
            data = await f.read(min(_CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data


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

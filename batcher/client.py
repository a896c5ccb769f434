"""The Diffio API client: one HTTP attempt per call, errors from batcher's tree.

Every method makes exactly one attempt; the runner owns retries
(:class:`batcher.retry.RetryPolicy`). What can go wrong comes out as an
:class:`~batcher.errors.ApiError` subclass and nothing else: answers are
classified by :func:`batcher.classify.classify`, and failed exchanges (the
HTTP client's, the OS's, timeouts) are translated in
:meth:`batcher.transport.Transport.error` only (``raise … from exc``), with
the endpoint attached.

API requests go over the lean HTTP/1.1 client (:mod:`batcher.http1`): one
write per request, the answer parsed in C, no aiohttp on the path (nor in
the process, for a run that moves no file).

API requests hold the concurrency cap, then pass the rate gate, then go out
at once (the cap comes first so a granted request never queues for a slot
afterwards, which would bunch requests past the gate's margin). A 429 is
reported to the gate here, so every caller slows down, and nobody else needs
to call :meth:`RateGate.on_rate_limited`.

File bytes are not the API's business: ``client.storage``
(:mod:`batcher.storage`, on aiohttp, made on first use) sends them to the
upload host or a signed URL and fetches outputs from signed URLs, without
the API key and without the rate gate, under the same concurrency cap and
the run's byte budget.

Both generations of the API are understood: ``create_project`` answers with
an upload session (today's API: upload in parts, then
``complete_project_upload``) or with one signed upload URL (the seed era),
and :class:`ProjectCreated` carries whichever came.

The API key lives in one headers mapping; it is never put in a message, and
every answer's body and headers are scrubbed of it (raw, JSON-escaped or
URL-encoded: :class:`~batcher.scrub.KeyScrubber`) before anything reads
them: this is the one seam through which the API's text enters batcher. Every request names
batcher and its version in ``User-Agent``.

The answers are typed in :mod:`batcher.answers`, which also holds the
checks that read them: the API's status words for a generation become one
:class:`~batcher.answers.GenerationStatus`, and the word as sent is kept
beside it for the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import anyio
import orjson

from batcher.answers import (
    DownloadInfo,
    GenerationAccepted,
    GenerationStatus,
    Progress,
    ProjectCreated,
    UploadConfirmed,
    bad_answer,
    is_http_url,
    is_number,
    optional_str,
    queue_position,
    required_str,
    upload_session,
)
from batcher.bandwidth import Bandwidth
from batcher.breaker import Breakers
from batcher.classify import classify
from batcher.errors import (
    ApiError,
    ConfigError,
    InvalidRequest,
    RateLimited,
    SubmissionsStopped,
)
from batcher.http1 import Headers
from batcher.ratelimit import Gate
from batcher.scrub import KeyScrubber
from batcher.transport import (
    API_TRANSPORT_EXCEPTIONS,
    HttpSessions,
    RequestCallback,
    Transport,
    judge_answer,
)
from batcher.version import USER_AGENT

if TYPE_CHECKING:
    import aiohttp

    from batcher.storage import Storage

__all__ = ["DiffioClient", "normalize_base_url"]


def normalize_base_url(url: str) -> str:
    """The API base ending in ``/v1``, from a URL with or without it.

    ``https://api.diffio.ai``, ``https://api.diffio.ai/``,
    ``https://api.diffio.ai/v1`` and ``https://api.diffio.ai/v1/`` all give
    ``https://api.diffio.ai/v1``. Raises :class:`ConfigError` for anything
    that is not an absolute http(s) URL without query or fragment.
    """
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"API base URL must be an absolute http(s) URL, not {text!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"API base URL must not have a query or fragment: {text!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


class DiffioClient:
    """Client for the Diffio API (either generation), one attempt per method call.

    ``http`` holds the run's connections (:class:`~batcher.transport.HttpSessions`),
    owned by the caller (the CLI), shared with everything else; an
    ``aiohttp.ClientSession`` may be given instead (it then carries the file
    transfers, and the client keeps its own API connections, closed by
    :meth:`aclose`). ``gate`` is acquired before every API request; ``cap``
    is held around every request, API or storage, and must not already be
    held by the calling task. ``timeout`` bounds an API request in all, and a storage
    transfer's connect and each read. ``on_request`` is called after each
    HTTP attempt with the endpoint, the status (``None`` when no answer
    arrived) and the seconds it took, for metrics. ``bandwidth`` is the run's
    byte budget for file transfers (None: no cap).
    """

    __slots__ = (
        "_bandwidth",
        "_base_url",
        "_fields",
        "_gate",
        "_generations_stopped",
        "_owns_http",
        "_path",
        "_pool",
        "_scrub",
        "_storage",
        "_timeout",
        "_transport",
        "_waiting_generations",
    )

    def __init__(
        self,
        http: HttpSessions | aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        gate: Gate,
        cap: anyio.CapacityLimiter,
        timeout: float = 60.0,
        on_request: RequestCallback | None = None,
        bandwidth: Bandwidth | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        if not api_key or any(c.isspace() or ord(c) < 32 for c in api_key):
            raise ConfigError("the API key is empty or contains whitespace or control characters")
        if not api_key.isascii():
            # An HTTP header carries bytes; the key is never shown, not even in part.
            raise ConfigError("the API key contains characters other than ASCII")
        if timeout <= 0:
            raise ConfigError("timeout must be positive")
        # After a 402 no generation request may leave; those waiting for the
        # rate gate are woken to give up (see stop_generations).
        self._generations_stopped = False
        self._waiting_generations: set[anyio.CancelScope] = set()
        self._base_url = normalize_base_url(base_url)
        self._scrub = KeyScrubber(api_key)
        # The header lines every API request carries, built once; the key
        # is in them, so they are never shown.
        self._fields = (
            f"Authorization: Bearer {api_key}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: application/json\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
        ).encode("latin-1")
        self._gate = gate
        self._timeout = timeout
        self._owns_http = not isinstance(http, HttpSessions)
        if not isinstance(http, HttpSessions):
            http = HttpSessions(files=http)
        parts = urlsplit(self._base_url)
        self._pool = http.api(f"{parts.scheme}://{parts.netloc}")
        self._path = quote(parts.path, safe="/%")
        self._transport = Transport(http=http, cap=cap, timeout=timeout, clock=gate.clock,
                                    on_request=on_request, breakers=breakers)
        self._bandwidth = bandwidth
        self._storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        """File bytes up and down (:mod:`batcher.storage`, which imports aiohttp)."""
        if self._storage is None:
            from batcher.storage import Storage

            self._storage = Storage(self._transport, self._bandwidth)
        return self._storage

    async def aclose(self) -> None:
        """Close the connections the client opened itself (none when given ``HttpSessions``)."""
        if self._owns_http:
            await self._transport.http.aclose()

    async def __aenter__(self) -> DiffioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def breakers(self) -> Breakers | None:
        """The circuit breakers of the hosts this client talks to (None: none)."""
        return self._transport.breakers

    @property
    def base_url(self) -> str:
        """The normalized API base, ending in ``/v1``."""
        return self._base_url

    def __repr__(self) -> str:
        return f"DiffioClient(base_url={self._base_url!r}, key=***)"

    # -- API endpoints --------------------------------------------------------

    async def create_project(
        self, *, file_name: str, content_type: str, content_length: int
    ) -> ProjectCreated:
        """``POST create_project``: a project and where its file goes.

        Today's API answers an ``upload`` session (parts on the upload
        host); the seed era a signed ``uploadUrl``. A file over the API's
        upload limit may be refused here already (413).
        """
        endpoint = "create_project"
        obj = await self._call(
            endpoint,
            {"fileName": file_name, "contentType": content_type, "contentLength": content_length},
        )
        project_id = required_str(obj, "apiProjectId", endpoint)
        session = obj.get("upload")
        if isinstance(session, dict):
            upload = upload_session(session, endpoint)
            return ProjectCreated(
                api_project_id=project_id, upload_url=None, upload_method="PUT",
                object_path=optional_str(obj, "objectPath") or optional_str(session,
                                                                              "objectKey"),
                bucket=None,
                expires_at=optional_str(obj, "expiresAt") or upload.expires_at,
                upload=upload,
            )
        upload_url = required_str(obj, "uploadUrl", endpoint)
        if not is_http_url(upload_url):
            bad_answer(endpoint, obj, f"uploadUrl is not an http(s) URL: {upload_url[:100]!r}")
        return ProjectCreated(
            api_project_id=project_id,
            upload_url=upload_url,
            upload_method=(optional_str(obj, "uploadMethod") or "PUT").upper(),
            object_path=optional_str(obj, "objectPath"),
            bucket=optional_str(obj, "bucket"),
            expires_at=optional_str(obj, "expiresAt"),
        )

    async def complete_project_upload(self, *, api_project_id: str) -> UploadConfirmed:
        """``POST complete_project_upload``: confirm the project's upload (today's API).

        Idempotent: confirming again answers the same. Until the upload host
        has completed the upload the API answers 409 ``UPLOAD_MISSING``.
        """
        endpoint = "complete_project_upload"
        obj = await self._call(endpoint, {"apiProjectId": api_project_id})
        size = obj.get("sizeBytes")
        return UploadConfirmed(
            api_project_id=optional_str(obj, "apiProjectId") or api_project_id,
            status=optional_str(obj, "status") or "uploaded",
            size_bytes=size if isinstance(size, int) and not isinstance(size, bool) else None,
        )

    async def create_generation(
        self,
        *,
        model: str,
        api_project_id: str,
        sampling: Mapping[str, Any],
        params: Mapping[str, Any],
        idempotency_key: str,
    ) -> GenerationAccepted:
        """``POST {model}-generation`` with the row's idempotency key.

        A replay (same key, same project) answers with the existing
        generation and ``replay=True``; nothing is charged twice.
        """
        # Quoted so a strange model name cannot step out of the path.
        endpoint = f"{quote(model, safe='.')}-generation"
        timing: list[float] = []
        obj = await self._call(
            endpoint,
            {
                "apiProjectId": api_project_id,
                "sampling": dict(sampling),
                "params": dict(params),
                "idempotencyKey": idempotency_key,
            },
            timing,
        )
        status = required_str(obj, "status", endpoint)
        return GenerationAccepted(
            generation_id=required_str(obj, "generationId", endpoint),
            api_project_id=optional_str(obj, "apiProjectId") or api_project_id,
            model_key=optional_str(obj, "modelKey"),
            status=GenerationStatus.of(status),
            api_status=status,
            replay=obj.get("idempotentReplay") is True,
            accepted_at=(timing[0] + timing[1]) / 2.0 if timing else None,
        )

    async def get_progress(self, *, generation_id: str, api_project_id: str | None) -> Progress:
        """``POST get_generation_progress`` for one generation."""
        endpoint = "get_generation_progress"
        payload: dict[str, Any] = {"generationId": generation_id}
        if api_project_id:
            payload["apiProjectId"] = api_project_id
        timing: list[float] = []
        obj = await self._call(endpoint, payload, timing)
        inference = obj.get("inference")
        progress = inference.get("progress") if isinstance(inference, dict) else None
        if isinstance(progress, bool) or not isinstance(progress, int | float):
            progress = None
        status = required_str(obj, "status", endpoint)
        queue = obj.get("queue")
        queue = queue if isinstance(queue, dict) else {}
        stages = obj.get("stageProgress")
        return Progress(
            generation_id=optional_str(obj, "generationId") or generation_id,
            api_project_id=optional_str(obj, "apiProjectId") or api_project_id,
            status=GenerationStatus.of(status),
            api_status=status,
            progress=None if progress is None else int(progress),
            error=optional_str(obj, "error"),
            error_details=optional_str(obj, "errorDetails"),
            stage=optional_str(obj, "stage"),
            stage_progress={k: int(v) for k, v in stages.items() if is_number(v)}
            if isinstance(stages, dict) else None,
            queue_position=queue_position(queue.get("position")),
            queue_message=optional_str(queue, "message"),
            read_at=(timing[0] + timing[1]) / 2.0 if timing else None,
        )

    async def get_download(
        self, *, generation_id: str, api_project_id: str, download_type: str = "audio"
    ) -> DownloadInfo:
        """``POST get_generation_download``: a fresh signed URL for the result."""
        endpoint = "get_generation_download"
        obj = await self._call(
            endpoint,
            {
                "generationId": generation_id,
                "apiProjectId": api_project_id,
                "downloadType": download_type,
            },
        )
        url = required_str(obj, "downloadUrl", endpoint)
        if not is_http_url(url):
            bad_answer(endpoint, obj, f"downloadUrl is not an http(s) URL: {url[:100]!r}")
        return DownloadInfo(
            download_url=url,
            file_name=optional_str(obj, "fileName"),
            mime_type=optional_str(obj, "mimeType"),
            storage_path=optional_str(obj, "storagePath"),
            download_type=optional_str(obj, "downloadType"),
            bucket=optional_str(obj, "bucket"),
        )

    def stop_generations(self) -> None:
        """Send no more generation requests; those waiting for the rate gate give up.

        Requests already on the wire are not touched: their answers still count.
        """
        self._generations_stopped = True
        for scope in list(self._waiting_generations):
            scope.cancel()

    async def _wait_turn(self, endpoint: str) -> None:
        if not endpoint.endswith("-generation"):
            # Polls and download links serve generations already paid for:
            # they go ahead of queued submissions (the rate is the same).
            await self._gate.acquire(urgent=endpoint in _URGENT)
            return
        with anyio.CancelScope() as waiting:
            self._waiting_generations.add(waiting)
            try:
                if not self._generations_stopped:
                    await self._gate.acquire()
            finally:
                self._waiting_generations.discard(waiting)
        if self._generations_stopped:
            raise SubmissionsStopped("not sent: the run stopped submitting", endpoint=endpoint)

    async def _call(self, endpoint: str, payload: Mapping[str, Any],
                    timing: list[float] | None = None) -> dict[str, Any]:
        """One request; ``timing`` gets when it was sent and when its answer arrived."""
        try:
            data = orjson.dumps(payload)
        except orjson.JSONEncodeError as exc:
            raise InvalidRequest(
                f"request body cannot be encoded as JSON: {exc}", endpoint=endpoint
            ) from exc
        url = f"{self._base_url}/{endpoint}"
        head = self._pool.head("POST", f"{self._path}/{endpoint}", self._fields)
        # Without waiting when a slot is free: `async with` would yield to the
        # loop first, an extra event-loop round per request on the hot path.
        cap = self._transport.cap
        try:
            cap.acquire_nowait()
        except anyio.WouldBlock:
            await cap.acquire()
        try:
            # The same request retried has the same key; different requests
            # failing together are what opens the host's breaker.
            async with self._transport.guarded(url, (endpoint, data)) as verdict:
                await self._wait_turn(endpoint)
                start = self._gate.clock.now()
                try:
                    answer = await self._pool.request(head, data, within=self._timeout)
                except API_TRANSPORT_EXCEPTIONS as exc:
                    verdict.unreachable()
                    self._transport.report(endpoint, None, start)
                    raise self._transport.error(exc, endpoint, scrub=self._scrub) from exc
                status = answer.status
                judge_answer(verdict, status)
                self._transport.report(endpoint, status, start)
                if timing is not None:
                    timing[:] = (start, self._gate.clock.now())
        finally:
            cap.release()
        body = self._scrub.bytes(answer.body)
        headers = answer.headers
        if status >= 300:
            # Error answers are read further (Location, Retry-After…): scrub them too.
            headers = Headers((name, self._scrub.text(value)) for name, value in headers.items())
        result = classify(
            status, headers, body, endpoint=endpoint, content_type=headers.get("Content-Type")
        )
        if isinstance(result, ApiError):
            if isinstance(result, RateLimited):
                self._gate.on_rate_limited(result.retry_after)
            raise result
        return result


# Endpoints about a generation already paid for (see RateGate.acquire).
_URGENT = frozenset({"get_generation_progress", "get_generation_download"})

"""DiffioClient against small aiohttp.web servers of its own on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import traceback
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web

from batcher.answers import (
    DownloadInfo,
    GenerationAccepted,
    GenerationStatus,
    Progress,
    ProjectCreated,
)
from batcher.bandwidth import Bandwidth
from batcher.client import DiffioClient, normalize_base_url
from batcher.clock import SystemClock
from batcher.errors import (
    ApiError,
    AuthError,
    ClientError,
    ConfigError,
    Conflict,
    DecodeError,
    InvalidRequest,
    LocalFileError,
    RateLimited,
    RequestBug,
    ServerError,
    SpendLimit,
    TransportError,
    UrlExpired,
)
from batcher.http1 import ConnectFailed, HttpFailure
from batcher.model import UploadPart, UploadSession
from batcher.outputs import fetch_to_file
from batcher.ratelimit import RateGate
from batcher.transport import HttpSessions
from batcher.version import USER_AGENT

KEY = "diffio_live_TOPSECRET_k3y_0123456789"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """Records every request; answers from ``routes`` (path -> handler)."""

    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    in_flight: int = 0
    max_in_flight: int = 0

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        handler = self.routes.get(request.path)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if handler is None:
                await self.record(request)
                return web.json_response({"error": "no route"}, status=404)
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        return body

    def json(self, path: str, payload: Any, status: int = 200, **headers: str) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            await self.record(request)
            return web.Response(
                body=orjson.dumps(payload), status=status,
                content_type="application/json", headers=headers,
            )

        self.routes[path] = handler


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", srv.dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    srv.url = f"http://{host}:{port}"
    yield srv
    srv.release.set()
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[HttpSessions]:
    async with HttpSessions() as s:
        yield s


@dataclass
class Harness:
    client: DiffioClient
    gate: RateGate
    cap: anyio.CapacityLimiter
    calls: list[tuple[str, int | None, float]]


@pytest.fixture
def make(session: HttpSessions, server: Server) -> Callable[..., Harness]:
    def factory(base: str | None = None, timeout: float = 5.0, tokens: int = 8) -> Harness:
        gate = RateGate(1000, clock=SystemClock())
        cap = anyio.CapacityLimiter(tokens)
        calls: list[tuple[str, int | None, float]] = []
        client = DiffioClient(
            session, base or server.url, KEY, gate=gate, cap=cap, timeout=timeout,
            on_request=lambda e, s, t: calls.append((e, s, t)),
        )
        return Harness(client, gate, cap, calls)

    return factory


def assert_key_absent(*things: object) -> None:
    for thing in things:
        texts = [str(thing), repr(thing)]
        if isinstance(thing, BaseException):
            texts.append("".join(traceback.format_exception(thing)))
            texts.append(repr(vars(thing)))
            cause = thing.__cause__
            while cause is not None:
                texts += [str(cause), repr(cause)]
                cause = cause.__cause__
        for text in texts:
            assert KEY not in text, text


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PROJECT = {
    "apiProjectId": "proj-123",
    "uploadUrl": "https://storage.example/upload?sig=abc",
    "uploadMethod": "PUT",
    "objectPath": "users/u/projects/proj-123/original/song.wav",
    "bucket": "diffio_api",
    "expiresAt": "2026-01-24T00:00:00Z",
}


# -- base URL --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.diffio.ai", "https://api.diffio.ai/v1"),
        ("https://api.diffio.ai/", "https://api.diffio.ai/v1"),
        ("https://api.diffio.ai/v1", "https://api.diffio.ai/v1"),
        ("https://api.diffio.ai/v1/", "https://api.diffio.ai/v1"),
        ("  http://127.0.0.1:8765/v1 ", "http://127.0.0.1:8765/v1"),
        ("https://proxy.example/diffio", "https://proxy.example/diffio/v1"),
    ],
)
def test_normalize_base_url(given: str, expected: str) -> None:
    assert normalize_base_url(given) == expected


@pytest.mark.parametrize(
    "bad", ["api.diffio.ai", "ftp://api.diffio.ai", "https://", "https://a/v1?x=1", "", "/v1"]
)
def test_normalize_base_url_refuses_non_urls(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_base_url(bad)


@pytest.mark.anyio
@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_every_base_url_form_reaches_v1(
    server: Server, make: Callable[..., Harness], suffix: str
) -> None:
    server.json("/v1/create_project", PROJECT)
    h = make(base=server.url + suffix)
    assert h.client.base_url == server.url + "/v1"
    await h.client.create_project(file_name="a.wav", content_type="audio/wav", content_length=1)
    assert [s.path for s in server.seen] == ["/v1/create_project"]


# -- the endpoints ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_create_project_sends_bearer_json_and_parses(
    server: Server, make: Callable[..., Harness]
) -> None:
    server.json("/v1/create_project", {**PROJECT, "uploadMethod": ""})
    h = make()
    created = await h.client.create_project(
        file_name="song.wav", content_type="audio/wav", content_length=1234
    )
    assert created == ProjectCreated(
        api_project_id="proj-123",
        upload_url=PROJECT["uploadUrl"],
        upload_method="PUT",  # empty -> PUT
        object_path=PROJECT["objectPath"],
        bucket="diffio_api",
        expires_at="2026-01-24T00:00:00Z",
    )
    (seen,) = server.seen
    assert seen.method == "POST"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert orjson.loads(seen.body) == {
        "fileName": "song.wav", "contentType": "audio/wav", "contentLength": 1234
    }
    assert h.gate.granted == 1
    assert [(e, s) for e, s, _ in h.calls] == [("create_project", 200)]
    assert h.calls[0][2] >= 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "answer",
    [
        {k: v for k, v in PROJECT.items() if k != "apiProjectId"},
        {k: v for k, v in PROJECT.items() if k != "uploadUrl"},
        {**PROJECT, "apiProjectId": 123},
        {**PROJECT, "uploadUrl": "file:///etc/passwd"},
    ],
)
async def test_create_project_without_required_fields_is_a_decode_error(
    server: Server, make: Callable[..., Harness], answer: dict[str, Any]
) -> None:
    server.json("/v1/create_project", answer)
    with pytest.raises(DecodeError) as info:
        await make().client.create_project(
            file_name="a.wav", content_type="audio/wav", content_length=1
        )
    assert info.value.endpoint == "create_project"
    assert info.value.http_status == 200
    assert info.value.retryable


@pytest.mark.anyio
async def test_create_generation_posts_to_the_model_path_with_the_key(
    server: Server, make: Callable[..., Harness]
) -> None:
    server.json(
        "/v1/diffio-3.5-generation",
        {"generationId": "gen-1", "apiProjectId": "proj-1", "modelKey": "diffio-3.5",
         "status": "processing", "idempotentReplay": True},
    )
    h = make()
    accepted = await h.client.create_generation(
        model="diffio-3.5", api_project_id="proj-1", sampling={"seed": 7},
        params={"prompt": "clean"}, idempotency_key="k" * 64,
    )
    assert accepted == GenerationAccepted(
        generation_id="gen-1", api_project_id="proj-1", model_key="diffio-3.5",
        status=GenerationStatus.RUNNING, api_status="processing", replay=True,
    )
    (seen,) = server.seen
    assert seen.path == "/v1/diffio-3.5-generation"
    assert orjson.loads(seen.body) == {
        "apiProjectId": "proj-1", "sampling": {"seed": 7}, "params": {"prompt": "clean"},
        "idempotencyKey": "k" * 64,
    }


@pytest.mark.anyio
async def test_create_generation_first_answer_is_not_a_replay_and_lacking_id_fails(
    server: Server, make: Callable[..., Harness]
) -> None:
    server.json("/v1/diffio-2.0-generation", {"generationId": "g", "status": "queued"})
    h = make()
    accepted = await h.client.create_generation(
        model="diffio-2.0", api_project_id="p", sampling={}, params={}, idempotency_key="k"
    )
    assert accepted.replay is False and accepted.api_project_id == "p"
    server.json("/v1/diffio-2.0-generation", {"status": "queued"})
    with pytest.raises(DecodeError, match="generationId"):
        await h.client.create_generation(
            model="diffio-2.0", api_project_id="p", sampling={}, params={}, idempotency_key="k"
        )


@pytest.mark.anyio
async def test_model_name_cannot_leave_the_path(
    server: Server, make: Callable[..., Harness]
) -> None:
    with pytest.raises(ClientError):
        await make().client.create_generation(
            model="../admin/x", api_project_id="p", sampling={}, params={}, idempotency_key="k"
        )
    assert server.seen[0].path.startswith("/v1/")
    assert "/admin/" not in server.seen[0].path


@pytest.mark.anyio
async def test_unencodable_body_is_refused_before_sending(
    server: Server, make: Callable[..., Harness]
) -> None:
    h = make()
    with pytest.raises(InvalidRequest) as info:
        await h.client.create_generation(
            model="diffio-3.5", api_project_id="p", sampling={"seed": 2**70}, params={},
            idempotency_key="k",
        )
    assert not info.value.retryable
    assert server.seen == [] and h.gate.granted == 0


@pytest.mark.anyio
async def test_get_progress_keeps_unknown_status_and_reads_inference(
    server: Server, make: Callable[..., Harness]
) -> None:
    server.json(
        "/v1/get_generation_progress",
        {"generationId": "gen-1", "apiProjectId": "proj-1", "status": "settling",
         "hasVideo": False,
         "preProcessing": {"status": "complete", "progress": 100},
         "inference": {"status": "running", "progress": 40},
         "error": None, "errorDetails": None},
    )
    h = make()
    progress = await h.client.get_progress(generation_id="gen-1", api_project_id=None)
    assert progress == Progress(
        generation_id="gen-1", api_project_id="proj-1", status=GenerationStatus.UNKNOWN,
        api_status="settling", progress=40, error=None, error_details=None,
    )
    assert orjson.loads(server.seen[0].body) == {"generationId": "gen-1"}


@pytest.mark.anyio
async def test_get_progress_failed_and_missing_status(
    server: Server, make: Callable[..., Harness]
) -> None:
    server.json(
        "/v1/get_generation_progress",
        {"generationId": "g", "status": "failed", "error": "Inference failed",
         "errorDetails": "CUDA out of memory", "inference": {"progress": None}},
    )
    h = make()
    progress = await h.client.get_progress(generation_id="g", api_project_id="p")
    assert (progress.status, progress.api_status, progress.error, progress.error_details,
            progress.progress) == (
        GenerationStatus.FAILED, "failed", "Inference failed", "CUDA out of memory", None
    )
    assert orjson.loads(server.seen[0].body) == {"generationId": "g", "apiProjectId": "p"}
    server.json("/v1/get_generation_progress", {"generationId": "g", "hasVideo": False})
    with pytest.raises(DecodeError, match="status"):
        await h.client.get_progress(generation_id="g", api_project_id="p")


@pytest.mark.anyio
async def test_get_download(server: Server, make: Callable[..., Harness]) -> None:
    server.json(
        "/v1/get_generation_download",
        {"generationId": "g", "apiProjectId": "p", "downloadType": "audio",
         "downloadUrl": "https://storage.example/x.mp3?sig=1", "fileName": "a.wav",
         "storagePath": "users/u/x.mp3", "bucket": "b", "mimeType": "audio/mpeg"},
    )
    info = await make().client.get_download(generation_id="g", api_project_id="p")
    assert info == DownloadInfo(
        download_url="https://storage.example/x.mp3?sig=1", file_name="a.wav",
        mime_type="audio/mpeg", storage_path="users/u/x.mp3", download_type="audio",
        bucket="b",
    )
    assert orjson.loads(server.seen[0].body) == {
        "generationId": "g", "apiProjectId": "p", "downloadType": "audio"
    }


# -- error answers through the client --------------------------------------------------------


@pytest.mark.anyio
async def test_402_comes_out_as_spend_limit_with_figures(
    server: Server, make: Callable[..., Harness]
) -> None:
    body = {"error": "Spend limit exceeded for this API key.", "code": "spendLimitExceeded",
            "spendLimitUsd": 10, "usedUsd": 9.2, "estimatedCostUsd": 1.5}
    server.json("/v1/diffio-3.5-generation", body, status=402)
    h = make()
    with pytest.raises(SpendLimit) as info:
        await h.client.create_generation(
            model="diffio-3.5", api_project_id="p", sampling={}, params={}, idempotency_key="k"
        )
    assert info.value.halts_submissions and not info.value.halts_run
    assert info.value.body == body
    assert "usedUsd=9.2" in info.value.figures()
    assert h.calls[0][:2] == ("diffio-3.5-generation", 402)


@pytest.mark.anyio
async def test_429_pauses_the_gate_for_everyone(
    server: Server, make: Callable[..., Harness]
) -> None:
    server.json(
        "/v1/get_generation_progress", {"error": "Rate limit exceeded.", "code": "rateLimited"},
        status=429, **{"Retry-After": "2"},
    )
    h = make()
    with pytest.raises(RateLimited) as info:
        await h.client.get_progress(generation_id="g", api_project_id=None)
    assert info.value.retry_after == 2.0
    assert 1.5 < h.gate.paused_for() <= 2.0
    assert h.gate.current_rate == 500.0
    assert not h.gate.has_capacity()


@pytest.mark.anyio
async def test_html_502_from_a_proxy(server: Server, make: Callable[..., Harness]) -> None:
    async def page(request: web.Request) -> web.Response:
        await server.record(request)
        return web.Response(
            text="<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", status=502,
            content_type="text/html",
        )

    server.routes["/v1/get_generation_progress"] = page
    with pytest.raises(ServerError, match="HTML page") as info:
        await make().client.get_progress(generation_id="g", api_project_id=None)
    assert "502 Bad Gateway" in info.value.message and info.value.retryable


@pytest.mark.anyio
async def test_redirect_is_not_followed_and_halts(
    server: Server, make: Callable[..., Harness]
) -> None:
    async def moved(request: web.Request) -> web.Response:
        await server.record(request)
        raise web.HTTPFound("/elsewhere")

    server.routes["/v1/create_project"] = moved
    with pytest.raises(RequestBug) as info:
        await make().client.create_project(
            file_name="a", content_type="audio/wav", content_length=1
        )
    assert info.value.halts_run
    assert [s.path for s in server.seen] == ["/v1/create_project"]


@pytest.mark.anyio
async def test_409_conflict_code(server: Server, make: Callable[..., Harness]) -> None:
    server.json("/v1/get_generation_download", {"code": "generationNotComplete"}, status=409)
    with pytest.raises(Conflict) as info:
        await make().client.get_download(generation_id="g", api_project_id="p")
    assert info.value.code == "generationNotComplete"


@pytest.mark.anyio
async def test_key_echoed_by_the_server_is_scrubbed(
    server: Server, make: Callable[..., Harness]
) -> None:
    async def echo(request: web.Request) -> web.Response:
        await server.record(request)
        auth = request.headers["Authorization"]
        return web.json_response(
            {"error": f"Invalid API key: {auth}", "code": "badKey"}, status=401
        )

    server.routes["/v1/create_project"] = echo
    with pytest.raises(AuthError) as info:
        await make().client.create_project(
            file_name="a", content_type="audio/wav", content_length=1
        )
    assert "Bearer ***" in info.value.message
    assert_key_absent(info.value, info.value.body)


# -- transport failures --------------------------------------------------------------


async def _cut_mid_answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "500"})
    await resp.prepare(request)
    await resp.write(b'{"generationId": "gen-1", "sta')
    assert request.transport is not None
    request.transport.close()
    return resp


async def _close_without_answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    assert request.transport is not None
    request.transport.close()
    await asyncio.sleep(0.05)
    return web.Response()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("handler", "words"),
    [(_cut_mid_answer, "cut short"), (_close_without_answer, "closed the connection")],
)
async def test_connection_closed_becomes_transport_error(
    server: Server, make: Callable[..., Harness], handler: Handler, words: str
) -> None:
    server.routes["/v1/get_generation_progress"] = handler
    h = make()
    with pytest.raises(TransportError) as info:
        await h.client.get_progress(generation_id="g", api_project_id=None)
    err = info.value
    assert words in err.message
    assert err.endpoint == "get_generation_progress" and err.retryable
    assert isinstance(err.__cause__, HttpFailure)
    assert h.calls[0][:2] == ("get_generation_progress", None)
    assert_key_absent(err)


@pytest.mark.anyio
async def test_no_answer_becomes_a_timeout_transport_error(
    server: Server, make: Callable[..., Harness]
) -> None:
    async def hang(request: web.Request) -> web.Response:
        await server.record(request)
        await server.release.wait()
        return web.Response()

    server.routes["/v1/get_generation_progress"] = hang
    h = make(timeout=0.3)
    with anyio.fail_after(3):
        with pytest.raises(TransportError, match="timeout") as info:
            await h.client.get_progress(generation_id="g", api_project_id=None)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert 0.25 < h.calls[0][2] < 2.0
    assert_key_absent(info.value)


@pytest.mark.anyio
async def test_refused_port_becomes_transport_error(make: Callable[..., Harness]) -> None:
    h = make(base=f"http://127.0.0.1:{refused_port()}")
    with pytest.raises(TransportError, match="cannot connect") as info:
        await h.client.create_project(file_name="a", content_type="audio/wav", content_length=1)
    assert isinstance(info.value.__cause__, ConnectFailed)
    assert h.calls[0][:2] == ("create_project", None)
    assert_key_absent(info.value, h.client)


def test_client_repr_and_bad_keys() -> None:
    gate = RateGate(10, clock=SystemClock())
    dummy: Any = object()  # the session is never used here
    client = DiffioClient(
        dummy, "https://api.diffio.ai", KEY, gate=gate, cap=anyio.CapacityLimiter(1)
    )
    assert repr(client) == "DiffioClient(base_url='https://api.diffio.ai/v1', key=***)"
    assert_key_absent(client)
    for bad in ["", "two words", "line\nbreak", "sk-caf\u00e9-words", "sk-\u2019break"]:
        with pytest.raises(ConfigError) as info:
            DiffioClient(dummy, "https://x", bad, gate=gate, cap=anyio.CapacityLimiter(1))
        assert "words" not in str(info.value) and "break" not in str(info.value)


@pytest.mark.anyio
async def test_concurrency_cap_and_gate_hold_for_every_api_call(
    server: Server, make: Callable[..., Harness]
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await server.record(request)
        await asyncio.sleep(0.05)
        return web.json_response({"generationId": "g", "status": "processing"})

    server.routes["/v1/get_generation_progress"] = slow
    h = make(tokens=2)
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(lambda: h.client.get_progress(generation_id="g", api_project_id=None))
    assert len(server.seen) == 8
    assert server.max_in_flight == 2
    assert h.gate.granted == 8


# -- signed storage URLs ---------------------------------------------------------------


def _upload_handler(server: Server, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            size += len(chunk)
        server.seen.append(
            Seen(request.method, request.raw_path, dict(request.headers),
                 f"{digest.hexdigest()}:{size}".encode())
        )
        return web.Response(text="denied" if status >= 400 else "", status=status)

    return handler


@pytest.mark.anyio
async def test_upload_streams_the_file_without_any_key(
    server: Server, make: Callable[..., Harness], tmp_path: Path
) -> None:
    size = 8 * 1024 * 1024 + 12345
    data = os.urandom(size)
    path = tmp_path / "big.wav"
    path.write_bytes(data)
    del data
    server.routes["/upload"] = _upload_handler(server)
    h = make()
    tracemalloc.start()
    try:
        await h.client.storage.upload(
            url=server.url + "/upload?sig=xyz", method="PUT", path=path,
            content_type="audio/wav", size=size,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # streamed: never the whole file in memory (reading it whole would be > 8 MiB)
    assert peak < 4 * 1024 * 1024, peak
    (seen,) = server.seen
    assert seen.method == "PUT"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert seen.body == f"{expected}:{size}".encode()
    assert seen.headers["Content-Type"] == "audio/wav"
    assert seen.headers["Content-Length"] == str(size)
    assert "Transfer-Encoding" not in seen.headers
    assert "Authorization" not in seen.headers
    assert not any(KEY in v for v in seen.headers.values())
    assert not {"X-Api-Key", "Xi-Api-Key"} & set(seen.headers)
    assert h.gate.granted == 0  # storage is not the API
    assert [(e, s) for e, s, _ in h.calls] == [("upload", 200)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "cls"), [(403, UrlExpired), (410, UrlExpired), (500, ServerError),
                        (404, ClientError)]
)
async def test_upload_failures(
    server: Server, make: Callable[..., Harness], tmp_path: Path, status: int,
    cls: type[ApiError],
) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(b"RIFF" * 100)
    server.routes["/upload"] = _upload_handler(server, status)
    with pytest.raises(cls) as info:
        await make().client.storage.upload(
            url=server.url + "/upload", method="POST", path=path, content_type="audio/wav",
            size=400,
        )
    assert type(info.value) is cls
    assert info.value.endpoint == "upload" and info.value.http_status == status
    assert server.seen[0].method == "POST"


@pytest.mark.anyio
async def test_upload_refuses_a_changed_or_missing_file(
    server: Server, make: Callable[..., Harness], tmp_path: Path
) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(b"x" * 10)
    server.routes["/upload"] = _upload_handler(server)
    h = make()
    with pytest.raises(LocalFileError) as info:
        await h.client.storage.upload(url=server.url + "/upload", method="PUT", path=path,
                              content_type="audio/wav", size=11)
    assert info.value.code == "fileChanged" and not info.value.retryable
    with pytest.raises(LocalFileError) as info:
        await h.client.storage.upload(url=server.url + "/upload", method="PUT",
                              path=tmp_path / "gone.wav", content_type="audio/wav", size=10)
    assert info.value.code == "fileUnreadable"
    assert server.seen == []


def _download_handler(server: Server, payload: bytes, status: int = 200,
                      cut: bool = False) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        server.seen.append(Seen(request.method, request.raw_path, dict(request.headers), b""))
        if status != 200:
            return web.Response(text="<Error>AccessDenied</Error>", status=status)
        resp = web.StreamResponse(headers={
            "Content-Type": "audio/mpeg", "Content-Length": str(len(payload) + (10 if cut else 0)),
        })
        await resp.prepare(request)
        for i in range(0, len(payload), 256 * 1024):
            await resp.write(payload[i:i + 256 * 1024])
        if cut:
            assert request.transport is not None
            request.transport.close()
        return resp

    return handler


@pytest.mark.anyio
async def test_download_streams_to_the_final_file_and_returns_sha256(
    server: Server, make: Callable[..., Harness], tmp_path: Path
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 7)
    server.routes["/out.mp3"] = _download_handler(server, payload)
    h = make()
    final = tmp_path / "sub" / "out.mp3"
    sha, size = await fetch_to_file(h.client.storage, server.url + "/out.mp3?sig=1", final)
    assert (sha, size) == (hashlib.sha256(payload).hexdigest(), len(payload))
    assert final.read_bytes() == payload
    assert os.listdir(final.parent) == ["out.mp3"]  # no temporary left
    (seen,) = server.seen
    assert seen.method == "GET"
    assert "Authorization" not in seen.headers
    assert not any(KEY in v for v in seen.headers.values())
    assert h.gate.granted == 0
    assert [(e, s) for e, s, _ in h.calls] == [("download", 200)]


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "cls"), [(403, UrlExpired), (410, UrlExpired),
                                              (404, ClientError), (503, ServerError)])
async def test_download_refused_leaves_no_file(
    server: Server, make: Callable[..., Harness], tmp_path: Path, status: int,
    cls: type[ApiError],
) -> None:
    server.routes["/out.mp3"] = _download_handler(server, b"", status=status)
    final = tmp_path / "out.mp3"
    with pytest.raises(cls) as info:
        await fetch_to_file(make().client.storage, server.url + "/out.mp3", final)
    assert type(info.value) is cls and info.value.endpoint == "download"
    assert os.listdir(tmp_path) == []


@pytest.mark.anyio
async def test_download_cut_short_is_a_transport_error_and_removes_the_part(
    server: Server, make: Callable[..., Harness], tmp_path: Path
) -> None:
    server.routes["/out.mp3"] = _download_handler(server, os.urandom(600_000), cut=True)
    h = make()
    with pytest.raises(TransportError) as info:
        await fetch_to_file(h.client.storage, server.url + "/out.mp3", tmp_path / "out.mp3")
    assert info.value.endpoint == "download"
    assert os.listdir(tmp_path) == []
    assert h.calls[0][:2] == ("download", None)


@pytest.mark.anyio
async def test_a_local_write_failure_is_a_local_error_not_the_apis(
    server: Server, make: Callable[..., Harness], tmp_path: Path
) -> None:
    server.routes["/out.mp3"] = _download_handler(server, b"abc")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(LocalFileError) as info:
        await fetch_to_file(make().client.storage, server.url + "/out.mp3",
                            tmp_path / "blocker" / "x.mp3")
    assert info.value.code == "outputWriteFailed" and "blocker" in info.value.message
    assert server.seen == []  # nothing asked of the storage
    # The temporary file cannot be created: the row's output is unwritable.
    final = tmp_path / "y.mp3"
    (tmp_path / ".y.mp3.taken.part").mkdir()
    with pytest.raises(LocalFileError) as info:
        await fetch_to_file(make().client.storage, server.url + "/out.mp3", final,
                            token=lambda: "taken")
    assert info.value.code == "outputUnwritable"
    assert not final.exists()


@pytest.mark.anyio
async def test_a_writers_own_error_passes_through_the_client(
    server: Server, make: Callable[..., Harness]
) -> None:
    server.routes["/out.mp3"] = _download_handler(server, os.urandom(600_000))
    h = make()

    async def full_disk(chunk: bytes) -> None:
        raise LocalFileError("disk full", code="outputUnwritable")

    with pytest.raises(LocalFileError):
        await h.client.storage.download(url=server.url + "/out.mp3", write=full_disk)
    assert h.calls[0][:2] == ("download", 200)


@pytest.mark.anyio
async def test_download_refused_port(make: Callable[..., Harness], tmp_path: Path) -> None:
    with pytest.raises(TransportError):
        await fetch_to_file(make().client.storage, f"http://127.0.0.1:{refused_port()}/x",
                            tmp_path / "x.mp3")
    assert os.listdir(tmp_path) == []


# -- today's API: upload sessions, parts, confirmation, progress extras ------------------

SESSION_ANSWER = {
    "apiProjectId": "proj-9",
    "objectPath": "users/u/projects/proj-9/original/a.wav",
    "expiresAt": "2030-01-01T00:00:00Z",
    "upload": {"uploadSessionId": "upls-1", "edgeBaseUrl": "EDGE/", "uploadToken": "tok-123",
               "objectKey": "users/u/projects/proj-9/original/a.wav",
               "partSizeBytes": 1024, "maxBytes": 4096, "expiresAt": "2030-01-01T00:00:00Z"},
}


@pytest.mark.anyio
async def test_create_project_reads_an_upload_session(server: Server,
                                                      make: Callable[..., Harness]) -> None:
    answer = orjson.loads(orjson.dumps(SESSION_ANSWER))
    answer["upload"]["edgeBaseUrl"] = server.url + "/edge/"
    server.json("/v1/create_project", answer)
    created = await make().client.create_project(file_name="a.wav", content_type="audio/wav",
                                                 content_length=3000)
    assert created.upload_url is None and created.upload is not None
    session = created.upload
    assert (session.session_id, session.edge_base_url, session.token) == (
        "upls-1", server.url + "/edge", "tok-123")
    assert (session.part_size, session.max_bytes, session.expires_at) == (
        1024, 4096, "2030-01-01T00:00:00Z")
    assert "tok-123" not in repr(created) and "tok-123" not in repr(session)
    # A seed-era answer still reads as a URL.
    server.json("/v1/create_project", PROJECT)
    seed = await make().client.create_project(file_name="a.wav", content_type="audio/wav",
                                              content_length=3)
    assert seed.upload is None and seed.upload_url == PROJECT["uploadUrl"]


@pytest.mark.anyio
async def test_every_request_names_batcher_in_user_agent(server: Server,
                                                         make: Callable[..., Harness],
                                                         tmp_path: Path) -> None:
    server.json("/v1/create_project", PROJECT)
    server.json("/v1/complete_project_upload",
                {"apiProjectId": "proj-1", "status": "uploaded", "sizeBytes": 3})
    server.routes["/upload"] = _upload_handler(server)
    h = make()
    await h.client.create_project(file_name="a.wav", content_type="audio/wav", content_length=3)
    confirmed = await h.client.complete_project_upload(api_project_id="proj-1")
    assert (confirmed.api_project_id, confirmed.status, confirmed.size_bytes) == (
        "proj-1", "uploaded", 3)
    path = tmp_path / "a.wav"
    path.write_bytes(b"abc")
    await h.client.storage.upload(url=server.url + "/upload", method="PUT", path=path,
                                  content_type="audio/wav", size=3)
    assert [s.headers.get("User-Agent") for s in server.seen] == [USER_AGENT] * 3
    assert USER_AGENT.startswith("batcher/")


def _edge(server: Server, *, part_status: int = 200, error: dict[str, Any] | None = None
          ) -> UploadSession:
    """An upload host under /edge that records what it gets and answers like the real
    one; returns a session on it."""

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await server.record(request)
        action = request.path.split("/v1/uploads/", 1)[1]
        if action.startswith("parts/"):
            if part_status != 200:
                return web.json_response(error, status=part_status)
            return web.json_response({"partNumber": int(action[6:]),
                                      "etag": hashlib.md5(body).hexdigest()})
        if action == "start":
            return web.json_response({"uploadId": "upl-1", "partSizeBytes": 512})
        return web.json_response({})

    for action in ("start", "parts/1", "parts/2", "complete", "abort"):
        server.routes[f"/edge/v1/uploads/{action}"] = answer
    return UploadSession("upls-1", server.url + "/edge", "tok-123", 1024)


@pytest.mark.anyio
async def test_the_upload_host_gets_the_token_never_the_key(
        server: Server, make: Callable[..., Harness], tmp_path: Path) -> None:
    session = _edge(server)
    path = tmp_path / "a.wav"
    data = os.urandom(900)
    path.write_bytes(data)
    h = make()
    started = await h.client.storage.start_upload(session)
    assert (started.upload_id, started.part_size) == ("upl-1", 512)  # the host's size wins
    digest = hashlib.sha256()
    etag = await h.client.storage.put_part(session, "upl-1", 2, path=path, offset=512,
                                           length=388, digests=(digest,))
    assert etag == hashlib.md5(data[512:]).hexdigest()
    assert digest.hexdigest() == hashlib.sha256(data[512:]).hexdigest()  # what was sent
    await h.client.storage.complete_upload(session, "upl-1", [UploadPart(2, etag, 388, "s")])
    await h.client.storage.abort_upload(session, "upl-1")
    start, part, complete, abort = server.seen
    assert start.method == "POST" and orjson.loads(start.body) == {}
    assert part.method == "PUT" and part.path == "/edge/v1/uploads/parts/2?uploadId=upl-1"
    assert part.headers["Content-Length"] == "388" and part.body == data[512:]
    assert orjson.loads(complete.body) == {"uploadId": "upl-1",
                                           "parts": [{"partNumber": 2, "etag": etag}]}
    assert orjson.loads(abort.body) == {"uploadId": "upl-1"}
    for seen in server.seen:
        assert seen.headers["Authorization"] == "Bearer tok-123"
        assert not any(KEY in v for v in seen.headers.values())
    assert h.gate.granted == 0  # the upload host is not the API


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "code", "cls"), [
    (403, "upload_session_expired", UrlExpired), (401, "invalid_token", UrlExpired),
    (404, "no_such_upload", ClientError), (409, "upload_confirmed", Conflict),
    (500, "internal_error", ServerError), (413, "payload_too_large", ClientError),
])
async def test_upload_host_errors_in_its_own_shape(
        server: Server, make: Callable[..., Harness], tmp_path: Path, status: int, code: str,
        cls: type[ApiError]) -> None:
    session = _edge(server, part_status=status,
                    error={"error": {"code": code, "message": "why not"}})
    path = tmp_path / "a.wav"
    path.write_bytes(b"x" * 10)
    with pytest.raises(cls) as info:
        await make().client.storage.put_part(session, "upl-1", 1, path=path, offset=0,
                                             length=10)
    assert type(info.value) is cls and info.value.code == code
    assert info.value.http_status == status and "why not" in str(info.value)


@pytest.mark.anyio
async def test_a_part_of_a_file_that_became_shorter_is_a_changed_file(
        server: Server, make: Callable[..., Harness], tmp_path: Path) -> None:
    session = _edge(server)
    path = tmp_path / "a.wav"
    path.write_bytes(b"x" * 100)
    with pytest.raises(LocalFileError) as info:
        await make().client.storage.put_part(session, "upl-1", 1, path=path, offset=0,
                                             length=500)
    assert info.value.code == "fileChanged"


@pytest.mark.anyio
async def test_get_progress_reads_stage_and_queue(server: Server,
                                                  make: Callable[..., Harness]) -> None:
    server.json("/v1/get_generation_progress", {
        "generationId": "gen-1", "apiProjectId": "proj-1", "status": "queued",
        "hasVideo": False, "stage": "preProcessing",
        "stageProgress": {"preProcessing": 0, "inference": 0},
        "queue": {"position": 7, "message": "Waiting for a worker"},
        "preProcessing": {"status": "pending", "progress": 0},
        "inference": {"status": "pending", "progress": 0}})
    got = await make().client.get_progress(generation_id="gen-1", api_project_id="proj-1")
    assert (got.stage, got.queue_position, got.queue_message) == (
        "preProcessing", 7, "Waiting for a worker")
    assert got.stage_progress == {"preProcessing": 0, "inference": 0}
    server.json("/v1/get_generation_progress", {
        "generationId": "gen-1", "status": "processing", "queue": {"position": 0}})
    out = await make().client.get_progress(generation_id="gen-1", api_project_id=None)
    assert out.queue_position is None and out.stage is None


@pytest.mark.anyio
async def test_every_byte_up_and_down_is_taken_from_the_bandwidth_budget(
        server: Server, session: HttpSessions, tmp_path: Path) -> None:
    upload = _edge(server)
    data = os.urandom(300_000)

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.Response(body=data)

    server.routes["/out.mp3"] = serve
    server.routes["/upload"] = _upload_handler(server)
    budget = Bandwidth(None)  # no cap: it only counts what is taken
    client = DiffioClient(session, server.url, KEY, gate=RateGate(1000, clock=SystemClock()),
                          cap=anyio.CapacityLimiter(4), bandwidth=budget)
    path = tmp_path / "a.wav"
    path.write_bytes(data[:1000])
    await client.storage.put_part(upload, "upl-1", 1, path=path, offset=0, length=1000)
    await client.storage.upload(url=server.url + "/upload", method="PUT", path=path,
                                content_type="audio/wav", size=1000)
    assert budget.taken == 2000
    await fetch_to_file(client.storage, server.url + "/out.mp3", tmp_path / "o.mp3")
    assert budget.taken == 2000 + len(data)

"""The lean HTTP/1.1 client (batcher.http1) against real loopback servers.

Most servers here are raw ``asyncio.start_server`` servers that write the
exact bytes a test chooses, so the framing, the pauses and the way a
connection ends are under the test's control; the server side records every
accept, every request as received, and whether it saw the client close.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import pytest
import trustme
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher import http1
from batcher.http1 import (
    Answer,
    BadHttp,
    ConnectFailed,
    CutShort,
    Disconnected,
    Headers,
    Http1Pool,
    HttpFailure,
)
from batcher.transport import HttpSessions

SECRET = "Bearer diffio_live_SECRET_0123456789"
FIELDS = f"Authorization: {SECRET}\r\nX-Caller: yes\r\n".encode("latin-1")
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- a raw server ------------------------------------------------------------------------


@dataclass
class Req:
    """One request as the server received it."""

    head: bytes  # the request line and header lines, through the blank line
    body: bytes

    @property
    def line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> list[tuple[str, str]]:
        out = []
        for raw in self.head.split(b"\r\n")[1:]:
            if raw:
                name, _, value = raw.decode("latin-1").partition(":")
                out.append((name, value.strip()))
        return out

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class Peer:
    """The server's side of one accepted connection."""

    def __init__(self, server: RawServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.requests: list[Req] = []
        self.eof = asyncio.Event()  # set once the client's end is seen closed

    async def request(self) -> Req | None:
        """The next whole request, or None once the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            req = Req(head, b"")
            length = req.header("Content-Length")
            if length:
                req.body = await self.reader.readexactly(int(length[0]))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        self.requests.append(req)
        self.server.requests.append(req)
        return req

    async def send(self, *pieces: bytes, pause: float = 0.0) -> None:
        for i, piece in enumerate(pieces):
            if i and pause:
                await asyncio.sleep(pause)
            self.writer.write(piece)
            await self.writer.drain()

    async def wait_eof(self) -> None:
        """Read (and drop) until the client closes its end."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eof.set()

    def close(self) -> None:
        self.writer.close()


Script = Callable[[Peer], Awaitable[None]]


class RawServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.peers: list[Peer] = []
        self.requests: list[Req] = []
        self.url = ""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def accepts(self) -> int:
        return len(self.peers)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, reader, writer)
        self.peers.append(peer)
        try:
            await self.script(peer)
        except ConnectionError:
            peer.eof.set()
        except asyncio.CancelledError:
            pass  # the server is stopping: this task of ours just ends
        finally:
            writer.close()

    async def start(self, host: str = "127.0.0.1", ssl_ctx: ssl.SSLContext | None = None,
                    scheme: str = "http", name: str | None = None) -> None:
        self._server = await asyncio.start_server(self._handle, host, 0, ssl=ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        shown = name or (f"[{host}]" if ":" in host else host)
        self.url = f"{scheme}://{shown}:{self.port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def serve(script: Script, **kw: object) -> AsyncIterator[RawServer]:
    srv = RawServer(script)
    await srv.start(**kw)  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        await srv.stop()


def answering(*answers: bytes) -> Script:
    """Answer each request on a connection with the next of ``answers`` (the last repeats)."""

    async def script(peer: Peer) -> None:
        n = 0
        while await peer.request() is not None:
            await peer.send(answers[min(n, len(answers) - 1)])
            n += 1

    return script


@contextlib.asynccontextmanager
async def pool_for(url: str, **kw: object) -> AsyncIterator[Http1Pool]:
    pool = Http1Pool(url, **kw)  # type: ignore[arg-type]
    try:
        yield pool
    finally:
        await pool.aclose()


async def post(pool: Http1Pool, body: bytes = b'{"a":1}', *, within: float = 2.0,
               target: str = "/v1/thing") -> Answer:
    return await pool.request(pool.head("POST", target, FIELDS), body, within=within)


async def settle(check: Callable[[], bool], limit: float = 2.0) -> None:
    """Let the loop run until ``check()`` holds (a test failure after ``limit`` seconds)."""
    with anyio.fail_after(limit):
        while not check():  # noqa: ASYNC110 - the state polled is the pool's, with no event
            await asyncio.sleep(0.002)


async def seen_eof(peer: Peer, limit: float = 2.0) -> None:
    with anyio.fail_after(limit):
        await peer.eof.wait()


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- keep-alive --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sequential_requests_reuse_one_connection() -> None:
    async with serve(answering(OK)) as srv, pool_for(srv.url) as pool:
        for _ in range(5):
            answer = await post(pool)
            assert answer == Answer(200, Headers({"content-type": "application/json",
                                                  "content-length": "11"}), b'{"ok":true}')
        assert srv.accepts == 1
        assert len(srv.requests) == 5
        assert pool.open_connections == 1


@pytest.mark.anyio
async def test_concurrent_requests_each_have_a_connection_and_max_idle_bounds_the_kept() -> None:
    release = asyncio.Event()

    async def slow(peer: Peer) -> None:
        while await peer.request() is not None:
            await release.wait()
            await peer.send(OK)

    async with serve(slow) as srv, pool_for(srv.url, max_idle=2) as pool:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(post, pool)
            await settle(lambda: len(srv.requests) == 4)
            assert srv.accepts == 4 and pool.open_connections == 4
            release.set()
        # Two kept idle, the other two closed (and the server sees them close).
        await settle(lambda: sum(p.eof.is_set() for p in srv.peers) == 2)
        assert pool.open_connections == 2
        for _ in range(2):
            await post(pool)
        assert srv.accepts == 4


@pytest.mark.anyio
async def test_connection_close_answer_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"

    async def script(peer: Peer) -> None:
        # The server leaves its end open: the client must close.
        while await peer.request() is not None:
            await peer.send(closing)

    async with serve(script) as srv, pool_for(srv.url) as pool:
        assert (await post(pool)).body == b"ok"
        await seen_eof(srv.peers[0])
        assert pool.open_connections == 0
        assert (await post(pool)).body == b"ok"
        assert srv.accepts == 2


@pytest.mark.anyio
@pytest.mark.parametrize("keep_alive", [False, True])
async def test_http10_answers(keep_alive: bool) -> None:
    fields = b"Connection: keep-alive\r\n" if keep_alive else b""
    answer = b"HTTP/1.0 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % fields
    expected = Headers({"content-length": "2"})
    if keep_alive:
        dict.__setitem__(expected, "connection", "keep-alive")
    async with serve(answering(answer)) as srv, pool_for(srv.url) as pool:
        for _ in range(2):
            assert await post(pool) == Answer(200, expected, b"ok")
        # HTTP/1.0 keeps a connection only when the answer asks to.
        assert srv.accepts == (1 if keep_alive else 2)


@pytest.mark.anyio
async def test_http10_answer_without_length_reads_until_close() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"all ", b"of it",
                        pause=0.01)
        peer.close()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        answer = await post(pool)
        assert (answer.status, answer.body) == (200, b"all of it")
        await settle(lambda: pool.open_connections == 0)


@pytest.mark.anyio
async def test_idle_connection_older_than_idle_seconds_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "IDLE_SECONDS", 0.05)
    async with serve(answering(OK)) as srv, pool_for(srv.url) as pool:
        await post(pool)
        await post(pool)  # well within the idle time: the same connection
        assert srv.accepts == 1
        await asyncio.sleep(0.08)
        await post(pool)
        assert srv.accepts == 2
        await seen_eof(srv.peers[0])  # the stale one was closed, not leaked
        assert pool.open_connections == 1


@pytest.mark.anyio
async def test_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def one_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        await asyncio.sleep(0.01)
        peer.close()

    async with serve(one_then_close) as srv, pool_for(srv.url) as pool:
        for n in range(1, 4):
            assert (await post(pool)).status == 200  # no failed request
            await settle(lambda: pool.open_connections == 0)  # the close was seen
            assert srv.accepts == n


# -- framing -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_content_length_body_is_exact_and_the_next_answer_follows() -> None:
    answers = (b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nfirst",
               b"HTTP/1.1 404 Not Found\r\nContent-Length: 6\r\n\r\nsecond")
    async with serve(answering(*answers)) as srv, pool_for(srv.url) as pool:
        a, b = await post(pool), await post(pool)
        assert (a.status, a.body) == (201, b"first")
        assert (b.status, b.body) == (404, b"second")
        assert srv.accepts == 1


@pytest.mark.anyio
async def test_chunked_with_extensions_and_trailers() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;name=value\r\nhello\r\n"
               b"6;quoted=\"a b\";flag\r\n world\r\n"
               b"A\r\n, chunked!\r\n"
               b"0\r\nX-Checksum: abc\r\nX-More: 1\r\n\r\n")
    async with serve(answering(chunked)) as srv, pool_for(srv.url) as pool:
        for _ in range(2):
            answer = await post(pool)
            assert answer.body == b"hello world, chunked!"
            assert answer.headers["transfer-encoding"] == "chunked"
            # Trailers are read as headers of the answer.
            assert answer.headers.get("X-Checksum") == "abc"
        assert srv.accepts == 1  # the whole chunked answer was consumed: reusable


def _big_answer(n: int, chunked: bool) -> tuple[bytes, bytes]:
    """An answer of a few hundred KiB (several reads), its body distinct per ``n``."""
    body = bytes((i * 7 + n) % 251 for i in range(300_000 + n * 1000))
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 50_000]), body[i:i + 50_000])
                          for i in range(0, len(body), 50_000))
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
                + b"0\r\n\r\n"), body
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), body


async def _big_answers_at_once(ca: trustme.CA | None) -> None:
    async def script(peer: Peer) -> None:
        while (req := await peer.request()) is not None:
            n = int(req.body)
            wire = _big_answer(n, chunked=n % 2 == 1)[0]
            # In pieces, so the connections' reads interleave.
            for i in range(0, len(wire), 70_000):
                await peer.send(wire[i:i + 70_000])
                await asyncio.sleep(0.001)

    server = tls_server(ca, script) if ca is not None else serve(script)
    async with server as srv, pool_for(
            srv.url, ssl_context=client_ctx(ca) if ca is not None else None) as pool:
        got: dict[int, bytes] = {}

        async def one(n: int) -> None:
            got[n] = (await post(pool, b"%d" % n, within=5.0)).body

        for _ in range(2):
            async with anyio.create_task_group() as tg:
                for n in range(4):
                    tg.start_soon(one, n)
            for n in range(4):
                assert got[n] == _big_answer(n, chunked=n % 2 == 1)[1], n
        assert srv.accepts == 4


@pytest.mark.anyio
async def test_large_answers_on_concurrent_connections_arrive_whole(ca: trustme.CA) -> None:
    await _big_answers_at_once(None)
    await _big_answers_at_once(ca)


@pytest.mark.anyio
async def test_no_length_body_ends_with_the_connection() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",
                        b'{"long":', b'"answer"}', pause=0.01)
        peer.close()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        answer = await post(pool)
        assert answer.body == b'{"long":"answer"}'
        await settle(lambda: pool.open_connections == 0)
        assert srv.accepts == 1


@pytest.mark.anyio
@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status_ends_without_length_or_close(status: int) -> None:
    answer_bytes = f"HTTP/1.1 {status} Whatever\r\nETag: \"x\"\r\n\r\n".encode()
    async with serve(answering(answer_bytes)) as srv, pool_for(srv.url) as pool:
        with anyio.fail_after(1):  # not waiting for a close that never comes
            a = await post(pool)
            b = await post(pool)
        assert a == b == Answer(status, Headers({"etag": '"x"'}), b"")
        assert srv.accepts == 1


@pytest.mark.anyio
@pytest.mark.parametrize("pause", [0.0, 0.02])
async def test_interim_100_continue_before_the_answer(pause: float) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n",
                            b"HTTP/1.1 200 OK\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nok",
                            pause=pause)

    async with serve(script) as srv, pool_for(srv.url) as pool:
        for _ in range(2):
            answer = await post(pool)
            assert answer == Answer(200, Headers({"x-final": "yes", "content-length": "2"}),
                                    b"ok")
        assert srv.accepts == 1


@pytest.mark.anyio
async def test_repeated_headers_are_joined_and_names_read_in_any_case() -> None:
    answer_bytes = (b"HTTP/1.1 200 OK\r\n"
                    b"CoNtEnT-TyPe: application/json\r\n"
                    b"Vary: Accept\r\nvary: Origin\r\nVARY: Cookie\r\n"
                    b"Retry-After:    7\r\n"
                    b"Content-Length: 2\r\n\r\n{}")
    async with serve(answering(answer_bytes)) as srv, pool_for(srv.url) as pool:
        h = (await post(pool)).headers
    assert srv.accepts == 1
    assert h["vary"] == h["VARY"] == h.get("Vary") == "Accept, Origin, Cookie"
    assert h["content-type"] == h.get("CONTENT-TYPE") == "application/json"
    assert "Content-Type" in h and "cOnTeNt-TyPe" in h
    assert "X-Absent" not in h and h.get("X-Absent") is None and h.get("x-absent", "d") == "d"
    assert 7 not in h  # type: ignore[comparison-overlap]  # not a str: not a header name
    assert h["retry-after"] == "7"
    assert set(h) == {"content-type", "vary", "retry-after", "content-length"}
    with pytest.raises(KeyError):
        h["X-Absent"]


# -- property: fragments and pauses do not change the answer -------------------------------

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                 min_size=1, max_size=12)
_VALUE = st.lists(st.text(alphabet="abcXYZ0123456789!#$%&'*+.^_`|~/;=,\"()", min_size=1,
                          max_size=10), max_size=4).map(" ".join)


@st.composite
def _answers(draw: st.DrawFn) -> tuple[bytes, str, int, list[tuple[str, str]], bytes]:
    """An answer on the wire: (bytes, framing, status, headers, body)."""
    status = draw(st.sampled_from([200, 201, 202, 400, 401, 404, 409, 429, 500, 503]))
    reason = draw(st.sampled_from(["OK", "Whatever It Is", ""]))
    names = draw(st.lists(_TOKEN.map(lambda s: "X-" + s), max_size=6))
    headers = [(name, draw(_VALUE)) for name in names]
    repeat: bool = draw(st.booleans())
    if headers and repeat:
        headers.append((headers[0][0].swapcase(), draw(_VALUE)))  # a repeat, another case
    body = draw(st.binary(max_size=400))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    wire = b""
    if draw(st.booleans()):
        wire += b"HTTP/1.1 100 Continue\r\n\r\n"
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    wire += f"HTTP/1.1 {status} {reason}\r\n".encode()
    wire += b"".join(f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\n"
    if framing == "chunked":
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=5)))
        edges = [0, *[c for c in cuts if c < len(body)], len(body)]
        for a, b in itertools.pairwise(edges):
            if b > a:
                ext = draw(st.sampled_from(["", ";x=1", ";flag"]))
                wire += f"{b - a:x}{ext}\r\n".encode() + body[a:b] + b"\r\n"
        wire += b"0\r\n\r\n"
    else:
        wire += body
    return wire, framing, status, headers, body


async def _exchange(pieces: list[bytes], pauses: list[float], framing: str) -> Answer:
    async def script(peer: Peer) -> None:
        await peer.request()
        for piece, pause in zip(pieces, pauses, strict=True):
            if pause:
                await asyncio.sleep(pause)
            await peer.send(piece)
        if framing == "close":
            peer.close()
        else:
            await peer.wait_eof()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        answer = await post(pool, within=1.0)
        if framing != "close":
            assert pool.open_connections == 1  # a whole keep-alive answer: kept
        return answer


async def _whole_and_split(wire: bytes, pieces: list[bytes], pauses: list[float],
                           framing: str) -> tuple[Answer, Answer]:
    return (await _exchange([wire], [0.0], framing), await _exchange(pieces, pauses, framing))


# A loop per example (anyio.run): draws stay outside the event loop.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec=_answers())
def test_fragments_and_pauses_give_the_same_answer(
    data: st.DataObject, spec: tuple[bytes, str, int, list[tuple[str, str]], bytes],
) -> None:
    wire, framing, status, headers, body = spec
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=12)))
    edges = [0, *cuts, len(wire)]
    pieces = [wire[a:b] for a, b in itertools.pairwise(edges)]
    pauses = data.draw(st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.003]),
                                min_size=len(pieces), max_size=len(pieces)))
    whole, split = anyio.run(_whole_and_split, wire, pieces, pauses, framing, backend="asyncio")
    assert split == whole
    expected = Headers()
    for name, value in headers:
        old = expected.get(name)
        dict.__setitem__(expected, name.lower(), value if old is None else f"{old}, {value}")
    assert whole == Answer(status, expected, body)


# -- failures ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_closing_before_any_byte_is_disconnected() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.close()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        with pytest.raises(Disconnected, match="closed the connection before answering"):
            await post(pool)
        assert pool.open_connections == 0
        assert len(srv.requests) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.",
        b"HTTP/1.1 200 OK\r\nContent-Type: appl",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        # The coding's name is case-insensitive: still chunked, still cut short.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    ],
    ids=["status-line", "mid-headers", "no-body", "mid-body", "mid-chunk", "between-chunks",
         "chunked-capitalized", "after-interim"],
)
async def test_server_closing_mid_answer_is_cut_short(partial: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(partial)
        await asyncio.sleep(0.01)
        peer.close()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        with pytest.raises(CutShort, match="cut short"):
            await post(pool)
        assert pool.open_connections == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"hello there\r\n\r\n",
        b"HTTP/1.1 2xx OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_not_http_is_bad_http(garbage: bytes) -> None:
    async with serve(answering(garbage)) as srv, pool_for(srv.url) as pool:
        with pytest.raises(BadHttp, match="not valid HTTP"):
            await post(pool)
        await seen_eof(srv.peers[0])  # the connection is dropped
        assert pool.open_connections == 0
        with pytest.raises(BadHttp):
            await post(pool)
        assert srv.accepts == 2


@pytest.mark.anyio
async def test_switching_protocols_is_bad_http() -> None:
    upgrade = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\n\r\n")
    async with serve(answering(upgrade)) as srv, pool_for(srv.url) as pool:
        with pytest.raises(BadHttp, match="switched protocols"):
            await post(pool)
        await seen_eof(srv.peers[0])


@pytest.mark.anyio
@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_answer_larger_than_the_limit_is_bad_http(
    monkeypatch: pytest.MonkeyPatch, framing: str,
) -> None:
    monkeypatch.setattr(http1, "MAX_ANSWER_BYTES", 100)

    def answer_of(size: int) -> bytes:
        body = b"x" * size
        if framing == "length":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, body)
        if framing == "chunked":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"".join(b"a\r\n%s\r\n" % body[i:i + 10] for i in range(0, size, 10))
                    + b"0\r\n\r\n")
        return b"HTTP/1.1 200 OK\r\n\r\n" + body

    sizes = iter([100, 101])

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer_of(next(sizes)))
        if framing == "close":
            peer.close()
        await peer.wait_eof()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        assert len((await post(pool)).body) == 100  # at the limit: fine
        await pool.aclose()
        with pytest.raises(BadHttp, match="larger than 100 bytes"):
            await post(pool)
        assert pool.open_connections == 0
        assert srv.accepts == 2


@pytest.mark.anyio
async def test_endless_headers_are_bad_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "MAX_ANSWER_BYTES", 1000)

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        for i in range(200):
            await peer.send(b"X-Filler-%d: %s\r\n" % (i, b"y" * 40))
        await peer.wait_eof()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        with pytest.raises(BadHttp, match="larger than 1000 bytes"):
            await post(pool)
        await seen_eof(srv.peers[0])


@pytest.mark.anyio
async def test_refused_port_is_connect_failed() -> None:
    port = refused_port()
    async with pool_for(f"http://127.0.0.1:{port}") as pool:
        with pytest.raises(ConnectFailed, match=f"cannot connect to 127.0.0.1:{port}") as info:
            await post(pool)
    assert isinstance(info.value, OSError)
    assert isinstance(info.value.__cause__, OSError)
    assert pool.open_connections == 0


@pytest.mark.anyio
@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
async def test_no_whole_answer_in_time_is_a_timeout_and_the_connection_is_closed(
    partial: bytes,
) -> None:
    async def script(peer: Peer) -> None:
        if await peer.request() is None:
            return
        if len(peer.server.peers) == 1:
            await peer.send(partial)
            await peer.wait_eof()  # never answers in full
        else:
            await peer.send(OK)
            await peer.wait_eof()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
            await post(pool, within=0.2)
        elapsed = time.monotonic() - start
        assert 0.18 <= elapsed < 1.0
        await seen_eof(srv.peers[0])
        assert pool.open_connections == 0
        assert (await post(pool)).status == 200
        assert srv.accepts == 2


@pytest.mark.anyio
async def test_a_connect_that_never_completes_is_a_timeout() -> None:
    # A listener that never accepts, its queue full: further connects hang
    # (or, where a kernel completes them anyway, nobody ever answers).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):
                filler = socket.socket()
                fillers.append(filler)
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            async with pool_for(f"http://127.0.0.1:{port}") as pool:
                start = time.monotonic()
                with pytest.raises(TimeoutError):
                    await post(pool, within=0.2)
                assert 0.18 <= time.monotonic() - start < 1.0
                assert pool.open_connections == 0
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.anyio
async def test_a_late_answer_after_the_timeout_is_not_taken_for_the_next() -> None:
    async def script(peer: Peer) -> None:
        n = 0
        while await peer.request() is not None:
            n += 1
            if n == 1:
                await asyncio.sleep(0.15)
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % n)

    async with serve(script) as srv, pool_for(srv.url) as pool:
        with pytest.raises(TimeoutError):
            await post(pool, within=0.05)
        assert (await post(pool)).body == b"1"  # a new connection's first answer
        assert srv.accepts == 2


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["move_on_after", "cancel_from_outside"])
async def test_cancelled_caller_closes_the_connection_and_the_pool_still_works(how: str) -> None:
    async def script(peer: Peer) -> None:
        first = len(peer.server.peers) == 1
        while await peer.request() is not None:
            if first:
                await peer.wait_eof()
                return
            await peer.send(OK)

    async with serve(script) as srv, pool_for(srv.url) as pool:
        if how == "move_on_after":
            with anyio.move_on_after(0.05) as scope:
                await post(pool)
            assert scope.cancelled_caught
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(post, pool)
                await settle(lambda: len(srv.requests) == 1)
                tg.cancel_scope.cancel()
        await seen_eof(srv.peers[0])
        await settle(lambda: pool.open_connections == 0)
        for _ in range(2):
            assert (await post(pool)).status == 200
        assert srv.accepts == 2


@pytest.mark.anyio
async def test_unsolicited_bytes_on_an_idle_connection_drop_it() -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(OK)
            if len(peer.server.peers) == 1:
                await asyncio.sleep(0.01)
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")

    async with serve(script) as srv, pool_for(srv.url) as pool:
        await post(pool)
        await seen_eof(srv.peers[0])
        assert pool.open_connections == 0
        answer = await post(pool)
        assert answer.body == b'{"ok":true}'
        assert srv.accepts == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    "extra",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale", b"HTTP/1.1 200 OK\r\nConte", b"junk"],
)
async def test_bytes_past_the_answer_in_the_same_segment_drop_the_connection(
    extra: bytes,
) -> None:
    async def script(peer: Peer) -> None:
        first = len(peer.server.peers) == 1
        while await peer.request() is not None:
            await peer.send(OK + extra if first else OK)

    async with serve(script) as srv, pool_for(srv.url) as pool:
        assert (await post(pool)).body == b'{"ok":true}'
        for _ in range(2):
            assert (await post(pool)).body == b'{"ok":true}'
        assert srv.accepts == 2
        await seen_eof(srv.peers[0])


# -- what the server receives ------------------------------------------------------------


@pytest.mark.anyio
async def test_request_bytes_as_received() -> None:
    body = '{"x": "é", "y": [1, 2]}'.encode()
    async with serve(answering(OK)) as srv, pool_for(srv.url) as pool:
        await post(pool, body, target="/v1/create_project?a=1")
        await post(pool, b"")
    first, second = srv.requests
    assert first.head == (
        b"POST /v1/create_project?a=1 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n" % srv.port
        + FIELDS
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    assert len(body) == 24 and first.body == body
    assert first.line == "POST /v1/create_project?a=1 HTTP/1.1"
    assert first.header("host") == [f"127.0.0.1:{srv.port}"]
    assert first.header("authorization") == [SECRET]
    assert second.header("content-length") == ["0"] and second.body == b""


@pytest.mark.anyio
async def test_request_to_an_aiohttp_server() -> None:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.path_qs, dict(request.headers), body))
        return web.json_response({"echo": len(body)}, headers={"X-Seen": str(len(seen))})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with pool_for(f"http://{host}:{port}") as pool:
            for i in range(3):
                answer = await post(pool, b'{"n":%d}' % i)
                assert answer.status == 200
                assert answer.body == b'{"echo": 7}'
                assert answer.headers["X-Seen"] == str(i + 1)
                assert answer.headers["content-type"].startswith("application/json")
            assert pool.open_connections == 1
    finally:
        await runner.cleanup()
    method, path, headers, body = seen[0]
    assert (method, path, body) == ("POST", "/v1/thing", b'{"n":0}')
    assert headers["Host"] == f"127.0.0.1:{port}"
    assert headers["Authorization"] == SECRET and headers["X-Caller"] == "yes"


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://api.example", b"api.example"),
        ("http://api.example:80", b"api.example"),
        ("http://api.example:443", b"api.example:443"),
        ("https://api.example", b"api.example"),
        ("https://API.Example:443", b"api.example"),
        ("https://api.example:8443", b"api.example:8443"),
        ("http://127.0.0.1:8080", b"127.0.0.1:8080"),
        ("http://[::1]:8080", b"[::1]:8080"),
        ("https://[2001:db8::1]", b"[2001:db8::1]"),
    ],
)
def test_host_header(origin: str, host: bytes) -> None:
    pool = Http1Pool(origin)
    assert pool.head("POST", "/v1/x", b"A: b\r\n") == (
        b"POST /v1/x HTTP/1.1\r\nHost: " + host + b"\r\nA: b\r\n")


@pytest.mark.parametrize("origin", ["ftp://api.example", "api.example", "http://", "https:///v1"])
def test_not_an_origin(origin: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        Http1Pool(origin)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.anyio
@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here")
async def test_ipv6_loopback_request() -> None:
    async with serve(answering(OK), host="::1") as srv, pool_for(srv.url) as pool:
        assert srv.url.startswith("http://[::1]:")
        assert (await post(pool)).status == 200
    assert srv.requests[0].header("host") == [f"[::1]:{srv.port}"]


# -- https -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def tls_server(ca: trustme.CA, script: Script) -> AsyncIterator[RawServer]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    async with serve(script, ssl_ctx=server_ctx, scheme="https", name="localhost") as srv:
        yield srv


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.mark.anyio
async def test_https_request(ca: trustme.CA) -> None:
    async with tls_server(ca, answering(OK)) as srv, \
            pool_for(srv.url, ssl_context=client_ctx(ca)) as pool:
        for _ in range(2):
            assert await post(pool) == Answer(200, Headers(
                {"content-type": "application/json", "content-length": "11"}), b'{"ok":true}')
        assert srv.accepts == 1
    assert srv.requests[0].header("host") == [f"localhost:{srv.port}"]
    assert srv.requests[0].body == b'{"a":1}'


@pytest.mark.anyio
@pytest.mark.parametrize("why", ["other-ca", "system-ca", "wrong-name"])
async def test_https_untrusted_certificate_is_connect_failed(ca: trustme.CA, why: str) -> None:
    ctx: ssl.SSLContext | None = None  # the system's trust
    if why == "other-ca":
        ctx = client_ctx(trustme.CA())
    elif why == "wrong-name":
        ctx = client_ctx(ca)
    async with tls_server(ca, answering(OK)) as srv:
        url = f"https://127.0.0.1:{srv.port}" if why == "wrong-name" else srv.url
        async with pool_for(url, ssl_context=ctx) as pool:
            with pytest.raises(HttpFailure) as info:
                await post(pool)
            assert pool.open_connections == 0
    err = info.value
    assert isinstance(err, ConnectFailed)
    text = str(err)
    assert f"cannot connect to {srv.url[8:]}:" in text or why == "wrong-name", text
    assert f":{srv.port}" in text and "certificate verify failed" in text, text
    assert srv.requests == []  # nothing was sent


@pytest.mark.anyio
async def test_https_to_a_plain_http_server_is_connect_failed(ca: trustme.CA) -> None:
    async def plain(peer: Peer) -> None:
        await peer.reader.read(1)  # a TLS hello: not HTTP, answered as a plain server would
        await peer.send(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    async with serve(plain, name="localhost") as srv, \
            pool_for(f"https://localhost:{srv.port}", ssl_context=client_ctx(ca)) as pool:
        with pytest.raises(ConnectFailed, match=f"cannot connect to localhost:{srv.port}"):
            await post(pool)
        assert pool.open_connections == 0


# -- the sessions and the pool's repr ----------------------------------------------------


@pytest.mark.anyio
async def test_sessions_aclose_closes_every_pools_connections() -> None:
    async with serve(answering(OK)) as one, serve(answering(OK)) as two:
        sessions = HttpSessions(limit=3)
        a, b = sessions.api(one.url), sessions.api(two.url)
        assert sessions.api(one.url) is a and a is not b
        assert a.max_idle == 3
        await post(a)
        await post(a)
        await post(b)
        assert (a.open_connections, b.open_connections) == (1, 1)
        await sessions.aclose()
        await seen_eof(one.peers[0])
        await seen_eof(two.peers[0])
        assert (a.open_connections, b.open_connections) == (0, 0)
        assert repr(sessions) == "HttpSessions(pools=[], files=False)"


@pytest.mark.anyio
async def test_repr_and_failures_hold_no_header_value() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        peer.close()

    async with serve(script) as srv, pool_for(srv.url) as pool:
        with pytest.raises(CutShort) as info:
            await post(pool)
        shown = [repr(pool), str(pool), str(info.value), repr(info.value)]
        assert repr(pool) == f"Http1Pool(http://127.0.0.1:{srv.port}, open=0)"
    for text in shown:
        assert "SECRET" not in text and "X-Caller" not in text, text

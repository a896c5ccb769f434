"""A lean HTTP/1.1 client for the API's small JSON requests.

Every API call is one small POST and one small JSON answer. aiohttp's client
spends about twice the CPU of the rest of batcher's work per request on
such an exchange (building a request object, a response object, a timer
context, tracing hooks), and importing it costs a run 110-150 ms before its
first request. This module does only what those calls need: keep-alive
connections on asyncio protocols, a request written in one piece, the
answer parsed by httptools (llhttp, the parser Node.js uses, in C). File
bytes (uploads in parts, signed URLs, downloads) still go through aiohttp
(:mod:`batcher.storage`), which streams them and is imported only when a
run moves files.

What it does not do, on purpose: follow redirects (the client treats a
redirect as an answer), cookies, proxies (batcher never read proxy
settings), compression (it asks for none), HTTP/2.

Failures below the level of an answer are :class:`HttpFailure`, a kind of
``OSError``, with the reason in words; a request that outlives its time
raises ``TimeoutError``. Nothing here ever puts a request's headers in a
message: they carry the API key.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "Answer",
    "BadHttp",
    "ConnectFailed",
    "CutShort",
    "Disconnected",
    "Headers",
    "Http1Pool",
    "HttpFailure",
]

# The API's answers are small JSON objects; anything this large is not one,
# and holding it in memory would let a broken server take the run down.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# An idle connection older than this is closed rather than reused: servers
# drop idle keep-alive connections after some seconds, and a request sent on
# one they just dropped fails for nothing.
IDLE_SECONDS = 15.0
# Bytes read at once; an answer larger than this arrives in several reads.
_READ_SIZE = 64 * 1024

class HttpFailure(OSError):
    """An exchange that ended without a whole answer; the message says why."""


class ConnectFailed(HttpFailure):
    """No connection could be made to the server."""


class Disconnected(HttpFailure):
    """The server closed the connection before answering (no byte came back)."""


class CutShort(HttpFailure):
    """The answer began and was cut short: the connection closed mid-answer."""


class BadHttp(HttpFailure):
    """What came back is not an HTTP/1.x answer this client can read."""


class Headers(dict[str, str]):
    """An answer's headers, by lower-case name; reads take any case.

    A header sent more than once holds its values joined with ``", "``.
    """

    __slots__ = ()

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


@dataclass(frozen=True, slots=True)
class Answer:
    """One whole answer: its status, headers and body."""

    status: int
    headers: Headers
    body: bytes


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; at most one exchange at a time.

    Buffered: the transport reads into the pool's one buffer (``recv_into``).
    A plain protocol's ``recv`` allocates a fresh 256 KiB object for every
    read and shrinks it, three system calls (mmap, mremap, munmap) per answer.
    """

    __slots__ = (
        "_body",
        "_got_bytes",
        "_headers",
        "_headers_done",
        "_pool",
        "_size",
        "closed",
        "idle_since",
        "parser",
        "transport",
        "waiter",
    )

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self._headers = Headers()
        self._body: list[bytes] = []
        self._size = 0
        self._got_bytes = False
        self._headers_done = False

    # -- asyncio.BufferedProtocol -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: other event loops' transports are not
        # subclasses of asyncio.Transport, and this one is a stream transport.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._pool._buffer

    def buffer_updated(self, nbytes: int) -> None:
        # The parser copies what it keeps before the buffer is read into again.
        self.data_received(self._pool._buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.waiter is None:
            # Bytes nobody asked for: the connection's state is unknown.
            self.close()
            return
        self._got_bytes = True
        if not self._headers_done:
            self._size += len(data)  # the head's bytes: the parser sets no bound of its own
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadHttp("the server switched protocols"))
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, HttpFailure):
                self._fail(cause)
            else:
                self._fail(BadHttp(f"the answer is not valid HTTP/1.1: {exc}"))
        else:
            if not self._headers_done and self._size > MAX_ANSWER_BYTES:
                self._fail(BadHttp(f"the answer is larger than {MAX_ANSWER_BYTES} bytes"))

    def eof_received(self) -> bool:
        # Not reusable from now on, even before connection_lost has run.
        self.closed = True
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and self._until_close():
            # An answer with neither a length nor chunks ends with the connection.
            self._finish(keep=False)
        elif self._got_bytes:
            self._fail(CutShort("the answer was cut short: the connection closed mid-answer"))
        else:
            why = f" ({exc})" if exc else ""
            self._fail(Disconnected(f"the server closed the connection before answering{why}"))

    # -- httptools callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.waiter is None:
            # More bytes after the answer, in the same read: nobody asked for them.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        dict.__setitem__(self._headers, key, text if old is None else f"{old}, {text}")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._size = 0  # from here on, the body's bytes

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            raise BadHttp(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            # An interim answer (100 Continue and the like): the real one follows.
            self._reset()
            self._got_bytes = True  # the exchange began: a close now cuts it short
            return
        self._finish(keep=self.parser.should_keep_alive())

    # -- the exchange ---------------------------------------------------------

    def _until_close(self) -> bool:
        h = self._headers
        coding = (h.get("transfer-encoding") or "").lower()
        return "content-length" not in h and "chunked" not in coding

    def _finish(self, *, keep: bool) -> None:
        waiter = self.waiter
        answer = Answer(self.parser.get_status_code(), self._headers, b"".join(self._body))
        self.waiter = None
        self._reset()
        if not keep:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _fail(self, exc: BaseException) -> None:
        waiter = self.waiter
        self.waiter = None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        """Close at once (abort: nothing of ours is left to send)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Http1Pool:
    """Keep-alive connections to one origin (``scheme://host[:port]``).

    ``max_idle`` connections are kept open between requests; more may be open
    at once (callers bound their own concurrency). ``ssl_context`` is used
    for https origins (default: the system's, made on the first connection).
    """

    __slots__ = ("_buffer", "_host_header", "_idle", "_loop", "_open", "_ssl", "host",
                 "max_idle", "port", "scheme")

    def __init__(self, origin: str, *, max_idle: int = 64,
                 ssl_context: _ssl.SSLContext | None = None) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self.port = parts.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = (host if self.port == default_port
                             else f"{host}:{self.port}").encode("idna")
        self.max_idle = max_idle
        self._ssl = ssl_context
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Shared by the pool's connections: a read is handed to the parser
        # before the loop reads anything else.
        self._buffer = memoryview(bytearray(_READ_SIZE))

    def __repr__(self) -> str:
        return f"Http1Pool({self.scheme}://{self.host}:{self.port}, open={len(self._open)})"

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in an exchange."""
        return len(self._open)

    def head(self, method: str, target: str, fields: bytes) -> bytes:
        """The start of a request: its line, ``Host`` and the caller's ``fields``.

        ``fields`` are whole header lines (each ending in CRLF); the caller
        builds them once and adds ``Content-Length`` per request.
        """
        return b"".join((method.encode("ascii"), b" ", target.encode("ascii"),
                         b" HTTP/1.1\r\nHost: ", self._host_header, b"\r\n", fields))

    async def request(self, head: bytes, body: bytes, *, within: float) -> Answer:
        """Send ``head`` (from :meth:`head`) with ``body`` and wait for the whole answer.

        ``within`` (seconds) bounds the exchange, connecting included. A connection
        whose exchange was cancelled, timed out or failed is closed, never
        reused.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        conn = self._take_idle(loop.time())
        if conn is None:
            conn = await self._connect(loop, within)
        waiter: asyncio.Future[Answer] = loop.create_future()
        conn.waiter = waiter
        timer = loop.call_at(deadline, _time_out, conn, waiter, within)
        transport = conn.transport
        assert transport is not None
        try:
            transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
            answer = await waiter
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
        if not conn.closed:
            self._give_back(conn, loop.time())
        return answer

    async def aclose(self) -> None:
        """Close every connection."""
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        self._open.clear()

    # -- connections ----------------------------------------------------------

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    def _give_back(self, conn: _Connection, now: float) -> None:
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def _connect(self, loop: asyncio.AbstractEventLoop, within: float) -> _Connection:
        ssl: _ssl.SSLContext | None = None
        if self.scheme == "https":
            if self._ssl is None:
                self._ssl = _ssl.create_default_context()
            ssl = self._ssl
        factory: Callable[[], _Connection] = lambda: _Connection(self)  # noqa: E731
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(factory, self.host, self.port, ssl=ssl,
                                       server_hostname=self.host if ssl else None),
                within)
        except TimeoutError:
            raise
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {reason}") from exc
        except _ssl.SSLError as exc:  # pragma: no cover - SSLError is an OSError today
            raise ConnectFailed(f"TLS with {self.host}:{self.port} failed: {exc}") from exc
        self._open.add(conn)
        return conn


def _time_out(conn: _Connection, waiter: asyncio.Future[Any], timeout: float) -> None:
    if not waiter.done():
        conn.waiter = None
        conn.close()
        waiter.set_exception(TimeoutError(f"no whole answer within {timeout:g} s"))

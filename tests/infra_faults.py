"""Infrastructure a test controls: a TCP proxy it can cut, a PostgreSQL server of its own.

Used by tests/test_infra_e2e.py to take the API host, the database or the
disk away from real `batcher run` processes, and by tests/test_outages.py to
take the API host away from in-process runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Self


def free_port() -> int:
    """A TCP port nobody listens on right now (bound to 0, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LoopProxy:
    """A TCP proxy to ``target`` on the running event loop; ``down()`` refuses and cuts.

    Down, it listens no more (connections are refused) and cuts every
    connection open through it; ``up()`` listens again on the same port
    (``port``: 0 picks a free one at the first ``up()``). In-process runs on
    the fake clock use it directly: the API host goes away and comes back
    while the runner's breakers wait on fake time.
    """

    def __init__(self, target: int, port: int = 0) -> None:
        self.target = target
        self.port = port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def url(self, base_url: str) -> str:
        """``base_url`` (the simulator's) through this proxy."""
        return base_url.replace(f":{self.target}/", f":{self.port}/")

    async def up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                      reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._open.discard(writer)
        self._open.discard(up_writer)


class Proxy:
    """A :class:`LoopProxy` on a thread of its own, for tests of real processes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._proxy = LoopProxy(target_port, free_port())
        self.port = self._proxy.port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _do(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def up(self) -> None:
        self._do(self._proxy.up())

    def down(self) -> None:
        async def down() -> None:
            self._proxy.down()

        self._do(down())


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server programs, or None when there is none."""
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(found, "initdb").exists():
            return Path(found)
    path = shutil.which("initdb")
    return Path(path).parent if path else None


class OwnPostgres:
    """A PostgreSQL server of the test's own: initdb in a temp folder, a free port.

    Run as the ``postgres`` user when the test runs as root (initdb refuses
    root). :meth:`restart`, :meth:`stop`, :meth:`start` and
    :meth:`terminate_all` are the faults.
    """

    def __init__(self) -> None:
        found = pg_bin()
        assert found is not None
        self.bin = found
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="batcher-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True,
                              check=check, timeout=120)

    def __enter__(self) -> Self:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate",
                  check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=60")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                  str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def sql(self, statement: str) -> str:
        done = subprocess.run(["psql", self.url, "-Atqc", statement], capture_output=True,
                              text=True, timeout=30, check=False)
        return done.stdout.strip()

    def terminate_all(self) -> int:
        """pg_terminate_backend every other client connection; how many were cut."""
        out = self.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
        return int(out or 0)


def wait_until(predicate: object, timeout: float, interval: float = 0.1) -> None:
    """Wait until ``predicate()`` is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(interval)

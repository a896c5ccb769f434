"""Shared factories: WAV files, a real simulator process, real batcher runs."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
from aiohttp import web


@pytest.fixture
def anyio_backend() -> str:
    # aiohttp and aiolimiter are asyncio-only.
    return "asyncio"


def write_wav(path: Path, seconds: float = 0.5, freq: float = 440.0, rate: int = 8000) -> Path:
    """A small mono 16-bit WAV; different freq -> different bytes -> different key."""
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
        for i in range(int(seconds * rate))
    )
    header = (
        b"RIFF" + struct.pack("<I", 36 + len(frames)) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", len(frames))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + frames)
    return path


class LoopbackApi:
    """An aiohttp server for ``/v1/{endpoint}`` on a loopback port, in a thread of this process.

    Use it as a context manager; ``base_url`` is ``http://127.0.0.1:PORT/v1``
    once entered. Subclasses answer requests in :meth:`handle`, and may set
    up and close what they need on the server's event loop in
    :meth:`on_start` and :meth:`on_stop`.
    """

    def __init__(self) -> None:
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), f"{type(self).__name__} did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.on_stop()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/v1/{endpoint:.*}", self.handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self._loop.run_until_complete(self.on_start())
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        self._loop.run_forever()

    async def on_start(self) -> None:
        """Runs on the server's loop before the first request."""

    async def on_stop(self) -> None:
        """Runs on the server's loop before it closes."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request to ``/v1/{endpoint}``."""
        raise NotImplementedError


@dataclass
class SimProcess:
    """A `batcher simulate` server in its own process."""

    proc: subprocess.Popen[str]
    base_url: str

    @property
    def root(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root + "/_sim/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, patch: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.root + "/_sim/config", data=json.dumps(patch).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_simulator(*args: str, api: str = "current") -> SimProcess:
    """Start `python -m batcher simulate --port 0 --api API ARGS` and wait for its URL.

    ``api`` is the API generation served: today's by default, whose model the
    runner these tests drive uses by default; ``seed`` for the seed era's.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "simulate", "--port", "0", "--api", api, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        found = re.search(r"https?://\S+", line)
        if found:
            # Keep draining output so the pipe never fills and blocks the server.
            import threading

            threading.Thread(target=lambda: proc.stdout and proc.stdout.read(),
                             daemon=True).start()
            return SimProcess(proc, found.group(0).rstrip("/.,"))
    proc.kill()
    raise RuntimeError("simulator did not print its URL")


@pytest.fixture
def simulator() -> Iterator[Any]:
    """A factory: sim = simulator('--duration', '0.2,0.5', api='seed'); stopped at teardown."""
    started: list[SimProcess] = []

    def factory(*args: str, api: str = "current") -> SimProcess:
        sim = start_simulator(*args, api=api)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


def batcher_env(api_key: str = "sim-key", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BATCHER_") and k != "DIFFIO_API_BASE_URL"}
    env["DIFFIO_API_KEY"] = api_key
    env.update(extra)
    return env


def run_batcher(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
                ) -> subprocess.CompletedProcess[str]:
    """Run `python -m batcher ARGS` to its end."""
    return subprocess.run([sys.executable, "-m", "batcher", *args], env=env or batcher_env(),
                          capture_output=True, text=True, timeout=timeout)


def export_records(ledger: Path | str) -> list[dict[str, Any]]:
    """The ledger's export records (a SQLite path or a PostgreSQL URL)."""
    done = run_batcher("export", str(ledger), "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def wait_for(predicate: Callable[[], object], timeout: float = 20.0,
             interval: float = 0.05) -> None:
    """Call ``predicate`` every ``interval`` seconds until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(interval)


def run_args(manifest: Path, api_base: str, *extra: str) -> list[str]:
    """``run MANIFEST --api-base API_BASE --ledger MANIFEST.sqlite EXTRA``."""
    return ["run", str(manifest), "--api-base", api_base,
            "--ledger", str(manifest.with_suffix(".sqlite")), *extra]


def plain_project_manifest(path: Path, n: int) -> Path:
    """``n`` rows on projects the simulator makes up, one prompt: no uploads, no downloads."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["apiProjectId", "prompt"])
        for i in range(n):
            writer.writerow([f"proj-{i:04d}", "clean"])
    return path


def start_hosts(args: list[str], hosts: int) -> list[subprocess.Popen[str]]:
    """``hosts`` processes of ``batcher ARGS`` (one job on a shared ledger)."""
    return [start_batcher(*args) for _ in range(hosts)]


def count_statuses(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many export records stand in each status."""
    out: dict[str, int] = {}
    for rec in records:
        out[rec["status"]] = out.get(rec["status"], 0) + 1
    return out


def start_batcher(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m batcher ARGS`` with its output piped; the caller waits for it."""
    return subprocess.Popen([sys.executable, "-m", "batcher", *args], env=env or batcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(args: list[str], predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Start ``batcher ARGS``, SIGKILL it as soon as ``predicate()`` is true.

    Fails when the run ends on its own first: the kill is what the caller
    wanted to test.
    """
    proc = start_batcher(*args)
    try:
        wait_for(lambda: predicate() or proc.poll() is not None, timeout=timeout)
        assert proc.poll() is None, "the run ended before the moment it was to be killed at"
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def _wait_for_activity(proc: subprocess.Popen[bytes], activity: Callable[[], int],
                       before: int) -> None:
    wait_for(lambda: activity() != before or proc.poll() is not None, timeout=60)


def kill_repeatedly(args: list[str], *, seed: int, kills: int, window: tuple[float, float],
                    activity: Callable[[], int] | None = None) -> Iterator[None]:
    """Start ``batcher ARGS`` again and again, SIGKILLing it at seeded random moments.

    Each run is killed after a pause drawn from ``window`` seconds; the
    generator yields once per kill of a live process, and stops early when a
    run ends on its own before its kill. With ``activity`` (a counter, such
    as the simulator's requests), the pause starts when the counter first
    moves after the start, not at the start: on a loaded machine a process
    may take longer to start than the whole window.
    """
    rng = random.Random(seed)
    for _ in range(kills):
        before = activity() if activity is not None else 0
        proc = subprocess.Popen([sys.executable, "-m", "batcher", *args], env=batcher_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if activity is not None:
            _wait_for_activity(proc, activity, before)
        time.sleep(rng.uniform(*window))
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        yield


# -- PostgreSQL: a fresh schema per test -------------------------------------------

PG_URL = os.environ.get("BATCHER_TEST_PG") or "postgresql://postgres@127.0.0.1:5432/test"


class PgSchemas:
    """Fresh schemas in the database at ``$BATCHER_TEST_PG``, dropped at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[str] = []

    def new(self) -> tuple[str, str]:
        """A new schema's name, and the ledger URL that keeps the ledger in it."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.made.append(name)
        return name, self.url + ("&" if "?" in self.url else "?") + f"schema={name}"

    async def drop_all(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.url, timeout=5)
        try:
            for name in self.made:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


async def _pg_unreachable(url: str) -> str | None:
    """None when ``url`` accepts a connection, else why not (password redacted)."""
    import asyncpg

    from batcher.ledger.postgres_sql import redact_url

    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return f"{redact_url(url)}: {type(exc).__name__}"
    await conn.close()
    return None


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[PgSchemas]:
    """Skips the test, saying why, only when the server cannot be reached."""
    why = asyncio.run(_pg_unreachable(PG_URL))
    if why is not None:
        pytest.skip(f"PostgreSQL not reachable ({why}); set BATCHER_TEST_PG to a server URL")
    schemas = PgSchemas(PG_URL)
    yield schemas
    asyncio.run(schemas.drop_all())


@pytest.fixture
def pg_url(pg_schemas: PgSchemas) -> str:
    """A ledger URL on a fresh PostgreSQL schema of this test's own."""
    return pg_schemas.new()[1]


def lease_takeovers(url: str) -> int:
    """How many rows hosts took over from others in the job at ``url`` (psql)."""
    schema = url.rsplit("schema=", 1)[1]
    found = subprocess.run(
        ["psql", url.split("?")[0], "-Atc",
         f"SELECT count(*) FROM {schema}.ledger_events WHERE event = 'leaseTakenOver'"],
        capture_output=True, text=True, check=True)
    return int(found.stdout.strip())

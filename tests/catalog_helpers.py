"""Test infrastructure for catalog tests: manifests, a rewriting proxy, file trees.

Everything here drives batcher from the outside only: manifests on disk, a
real simulator process behind an optional loopback proxy, and snapshots of
the folder a job runs in.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

__all__ = ["ApiProxy", "Hook", "tree_snapshot", "write_csv_manifest"]


def write_csv_manifest(path: Path, rows: Iterable[dict[str, str]]) -> Path:
    """A CSV manifest: one column per key used by any row, in first-seen order."""
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or ["file"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def tree_snapshot(root: Path, skip: Callable[[Path], bool] = lambda p: False
                  ) -> dict[str, str]:
    """Every entry below ``root`` (links not followed): relative path -> what it is.

    A file maps to ``file:`` and the sha256 of its bytes, a link to ``link:``
    and its target, a folder to ``dir``. Entries for which ``skip(path)`` is
    true are left out, with everything below them.
    """
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        base = Path(folder)
        kept = []
        for name in dirs:
            path = base / name
            if skip(path):
                continue
            if path.is_symlink():
                out[str(path.relative_to(root))] = f"link:{os.readlink(path)}"
                continue
            out[str(path.relative_to(root))] = "dir"
            kept.append(name)
        dirs[:] = kept
        for name in files:
            path = base / name
            if skip(path):
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            else:
                out[rel] = "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return out


async def _new_session() -> ClientSession:
    return ClientSession()  # made inside the loop it will run on


# (endpoint, JSON body of the request) -> an answer that replaces the simulator's, or None
Hook = Callable[[str, dict[str, Any]], web.StreamResponse | None]


class ApiProxy:
    """A loopback reverse proxy for a simulator's ``/v1`` API, in a thread of this process.

    Every API request is forwarded unchanged to ``upstream`` (a simulator's
    ``…/v1`` base URL) and its answer passed back, except that:

    * ``before(endpoint, body)``, when set, is called first; an answer it
      returns is given instead, and the simulator never sees the request;
    * ``after(endpoint, body)``, when set, is called once the simulator has
      answered (so whatever it did is done); an answer it returns replaces
      the simulator's.

    Hooks run on a worker thread, so they may block (to hold an answer until
    the test has done something) without stalling other requests. Signed
    storage URLs point at the simulator itself and do not pass here.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.before: Hook | None = None
        self.after: Hook | None = None
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    def __enter__(self) -> ApiProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._session is not None:
                await self._session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/v1/{endpoint:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self._session = self._loop.run_until_complete(_new_session())
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        raw = await request.read()
        try:
            body = await request.json() if raw.strip() else {}
        except ValueError:
            body = {}
        if self.before is not None:
            early = await asyncio.to_thread(self.before, endpoint, body)
            if early is not None:
                return early
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "x-api-key", "xi-api-key")}
        async with self._session.request(request.method, f"{self.upstream}/{endpoint}",
                                         data=raw, headers=headers,
                                         allow_redirects=False) as upstream:
            answer = web.Response(status=upstream.status, body=await upstream.read(),
                                  content_type=upstream.content_type)
            for name in ("Retry-After", "Location"):
                if name in upstream.headers:
                    answer.headers[name] = upstream.headers[name]
        if self.after is not None:
            late = await asyncio.to_thread(self.after, endpoint, body)
            if late is not None:
                return late
        return answer

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web
from conftest import LoopbackApi

__all__ = ["ApiProxy", "Hook", "job_args", "ledger_of", "sha256", "tree_snapshot",
           "write_csv_manifest"]


def sha256(data: bytes) -> str:
    """The sha256 hex of ``data``."""
    return hashlib.sha256(data).hexdigest()


def job_args(manifest: Path, api_base: str, *extra: str) -> list[str]:
    """``run MANIFEST`` with its default ledger and --out, quick polls, a loose rate."""
    return ["run", str(manifest), "--api-base", api_base, "--poll-interval", "0.2",
            "--rate", "50", *extra]


def ledger_of(manifest: Path) -> Path:
    """Where ``batcher run MANIFEST`` keeps its ledger when not told otherwise."""
    return manifest.with_name(manifest.stem + ".ledger.sqlite")


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
                out[rel] = "file:" + sha256(path.read_bytes())
    return out


# (endpoint, JSON body of the request) -> an answer that replaces the simulator's, or None
Hook = Callable[[str, dict[str, Any]], web.StreamResponse | None]


class ApiProxy(LoopbackApi):
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
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.before: Hook | None = None
        self.after: Hook | None = None
        self._session: ClientSession | None = None

    async def on_start(self) -> None:
        self._session = ClientSession()

    async def on_stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
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

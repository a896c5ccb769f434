"""A simulator served on loopback with fake clocks, and a client that speaks to it.

Shared by the in-process simulator tests (``test_simulator_*.py``).
"""

from __future__ import annotations

import io
import json
import wave
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from fakeclock import FakeClock

from batcher.simulator import SimConfig, Simulator, run_simulator

KEY = "sim-key"
WALL0 = 1_790_000_000.0  # 2026-09-21T...Z, inside one monthly period


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any
    text: str


async def _reply(resp: aiohttp.ClientResponse) -> Reply:
    text = await resp.text()
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    return Reply(resp.status, parsed, resp.headers, text)


@dataclass
class Harness:
    sim: Simulator
    http: aiohttp.ClientSession
    clock: FakeClock
    wall: FakeClock

    @property
    def base(self) -> str:
        assert self.sim.base_url is not None
        return self.sim.base_url

    @property
    def root(self) -> str:
        return self.base.removesuffix("/v1")

    async def call(
        self,
        endpoint: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        header: str = "Authorization",
        method: str = "POST",
        raw: bytes | None = None,
    ) -> Reply:
        headers = {}
        if key is not None:
            headers[header] = f"Bearer {key}" if header == "Authorization" else key
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(
            method, f"{self.base}/{endpoint}", data=data, headers=headers
        ) as resp:
            return await _reply(resp)

    async def project(self, audio: bytes | None = None, *, key: str = KEY) -> str:
        """A seed project created by create_project and, with ``audio``, uploaded."""
        reply = await self.call("create_project", {"fileName": "a.wav"}, key=key)
        assert reply.status == 200, reply.text
        if audio is not None:
            async with self.http.put(reply.body["uploadUrl"], data=audio) as resp:
                assert resp.status == 200
        project_id: str = reply.body["apiProjectId"]
        return project_id

    async def generate(self, project_id: str, model: str = "diffio-3.5", **fields: Any) -> Reply:
        return await self.call(f"{model}-generation", {"apiProjectId": project_id, **fields})

    # -- the current API's upload host ---------------------------------------

    async def session(self, size: int = 0, *, key: str = KEY) -> dict[str, Any]:
        """create_project on the current API: its whole answer."""
        reply = await self.call("create_project", {"fileName": "a.wav", "contentLength": size},
                                key=key)
        assert reply.status == 200, reply.text
        answer: dict[str, Any] = reply.body
        return answer

    async def edge(
        self,
        upload: Mapping[str, Any],
        method: str,
        action: str,
        *,
        body: Any = None,
        data: bytes | None = None,
        upload_id: str | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One call to the upload host of ``upload`` (a create_project ``upload`` object)."""
        sent = {"Authorization": f"Bearer {token or upload['uploadToken']}", **(headers or {})}
        params = {"uploadId": upload_id} if upload_id is not None else None
        payload = data if data is not None else json.dumps(body or {}).encode()
        url = f"{upload['edgeBaseUrl']}/v1/uploads/{action}"
        async with self.http.request(method, url, data=payload, params=params,
                                     headers=sent) as resp:
            return await _reply(resp)

    async def put_parts(self, upload: Mapping[str, Any], upload_id: str, data: bytes,
                        part_size: int) -> list[dict[str, Any]]:
        """PUT ``data`` in parts of ``part_size``; the receipts for complete."""
        receipts = []
        for number, start in enumerate(range(0, max(1, len(data)), part_size), 1):
            chunk = data[start:start + part_size]
            reply = await self.edge(upload, "PUT", f"parts/{number}", data=chunk,
                                    upload_id=upload_id)
            assert reply.status == 200, reply.text
            receipts.append({"partNumber": number, "etag": reply.body["etag"]})
        return receipts

    async def upload(self, created: Mapping[str, Any], data: bytes) -> str:
        """Start, put every part and complete an upload; returns the upload id."""
        upload = created["upload"]
        started = await self.edge(upload, "POST", "start")
        assert started.status == 200, started.text
        upload_id: str = started.body["uploadId"]
        receipts = await self.put_parts(upload, upload_id, data, started.body["partSizeBytes"])
        done = await self.edge(upload, "POST", "complete",
                               body={"uploadId": upload_id, "parts": receipts})
        assert done.status == 200, done.text
        return upload_id

    async def confirmed_project(self, data: bytes = b"RIFF....", *, key: str = KEY) -> str:
        """A current-API project uploaded in parts and confirmed."""
        created = await self.session(len(data), key=key)
        await self.upload(created, data)
        confirmed = await self.call("complete_project_upload",
                                    {"apiProjectId": created["apiProjectId"]}, key=key)
        assert confirmed.status == 200, confirmed.text
        project_id: str = created["apiProjectId"]
        return project_id


@asynccontextmanager
async def serve(config: SimConfig) -> AsyncIterator[Harness]:
    """A simulator with ``config`` on loopback; its clock starts at 1000 s, its wall at WALL0."""
    clock, wall = FakeClock(), FakeClock()
    clock.t, wall.t = 1000.0, WALL0
    sim = Simulator(config, clock=clock.now, wall=wall.now)
    async with run_simulator(sim), aiohttp.ClientSession() as http:
        yield Harness(sim, http, clock, wall)


def wav_bytes(seconds: float, rate: int = 100) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(bytes(int(seconds * rate)))
    return out.getvalue()

"""Signed upload and download URLs, served by the simulator itself.

They live under ``/_storage/``, never under ``/v1``, and take no API key: the
signature in the query string is the only credential, as with the signed
cloud-storage URLs of the real service. A request that carries an API key
header anyway is answered normally but counted
(``signed_url_requests_with_key``), because batcher must never leak its key
to storage.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping

from aiohttp import web

from batcher.simulator.audio import restored_audio
from batcher.simulator.state import SimState

__all__ = ["AUTH_HEADERS", "StorageRoutes", "UrlSigner", "carries_api_key"]

AUTH_HEADERS = ("Authorization", "X-Api-Key", "Xi-Api-Key")
UPLOAD_PREFIX = "/_storage/upload/"
DOWNLOAD_PREFIX = "/_storage/download/"


def carries_api_key(headers: Mapping[str, str]) -> bool:
    """True when any of the three API auth headers is present and non-empty."""
    return any(headers.get(name, "").strip() for name in AUTH_HEADERS)


class UrlSigner:
    """HMAC-SHA256 signatures over (purpose, object, expiry)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def __repr__(self) -> str:
        return "UrlSigner(secret=***)"

    def signature(self, purpose: str, name: str, expires: int) -> str:
        """The hex signature of one URL."""
        message = f"{purpose}\n{name}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def query(self, purpose: str, name: str, expires_wall: float) -> str:
        """``expires=…&sig=…`` for a URL valid until ``expires_wall`` (unix seconds)."""
        expires = math.floor(expires_wall)  # floor: a 0 s TTL is expired at once
        return f"expires={expires}&sig={self.signature(purpose, name, expires)}"

    def check(self, purpose: str, name: str, query: Mapping[str, str], now_wall: float) -> str:
        """``ok``, ``bad`` (missing or wrong signature) or ``expired``."""
        raw, sig = query.get("expires", ""), query.get("sig", "")
        try:
            expires = int(raw)
        except ValueError:
            return "bad"
        if not hmac.compare_digest(sig, self.signature(purpose, name, expires)):
            return "bad"
        return "expired" if now_wall > expires else "ok"


def _error(status: int, error: str, code: str) -> web.Response:
    return web.json_response({"error": error, "code": code}, status=status)


class StorageRoutes:
    """The two storage handlers: PUT an upload, GET a restored file."""

    def __init__(self, state: SimState, signer: UrlSigner) -> None:
        self.state = state
        self.signer = signer

    def upload_url(self, origin: str, api_project_id: str) -> tuple[str, float]:
        """A fresh signed upload URL and its expiry (unix seconds)."""
        expires = self.state.wall() + self.state.config.upload_ttl
        query = self.signer.query("upload", api_project_id, expires)
        return f"{origin}{UPLOAD_PREFIX}{api_project_id}?{query}", float(math.floor(expires))

    def download_url(self, origin: str, generation_id: str, ttl: float) -> str:
        """A fresh signed download URL for a complete generation, valid ``ttl`` seconds."""
        expires = self.state.wall() + ttl
        query = self.signer.query("download", generation_id, expires)
        return f"{origin}{DOWNLOAD_PREFIX}{generation_id}/restored.mp3?{query}"

    def add_to(self, app: web.Application) -> None:
        """Register the storage routes on ``app``."""
        app.router.add_route("*", UPLOAD_PREFIX + "{project}", self.upload)
        app.router.add_route("*", DOWNLOAD_PREFIX + "{generation}/restored.mp3", self.download)

    def _seen(self, request: web.Request) -> None:
        if carries_api_key(request.headers):
            self.state.stats.bump("signed_url_requests_with_key")

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """PUT (or POST) the raw bytes of a project's file."""
        response = await self._upload(request)
        self.state.stats.answered("upload", response.status)
        return response

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        if request.method not in ("PUT", "POST"):
            return _error(405, "Use PUT to upload.", "methodNotAllowed")
        project_id = request.match_info["project"]
        verdict = self.signer.check("upload", project_id, request.query, self.state.wall())
        if verdict != "ok" or project_id not in self.state.projects:
            if verdict == "expired":
                return _error(403, "The upload URL has expired.", "urlExpired")
            return _error(403, "Invalid signature.", "badSignature")
        # Streamed, because client_max_size only guards JSON bodies.
        chunks = [chunk async for chunk in request.content.iter_chunked(1 << 16)]
        self.state.store_upload(project_id, b"".join(chunks))
        return web.Response(status=200)

    async def download(self, request: web.Request) -> web.StreamResponse:
        """GET the restored MP3 of a complete generation."""
        response = await self._download(request)
        self.state.stats.answered("download", response.status)
        return response

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        if request.method not in ("GET", "HEAD"):
            return _error(405, "Use GET to download.", "methodNotAllowed")
        gen_id = request.match_info["generation"]
        verdict = self.signer.check("download", gen_id, request.query, self.state.wall())
        gen = self.state.generations.get(gen_id)
        if verdict == "bad" or gen is None:
            return _error(403, "Invalid signature.", "badSignature")
        if verdict == "expired":
            return _error(410, "The download URL has expired.", "urlExpired")
        self.state.stats.bump("downloads")
        return web.Response(body=restored_audio(gen.source_bytes), content_type="audio/mpeg")

"""Serving a receiver on a TCP port, and reading ``--webhook-listen HOST:PORT``.

The receiver binds 127.0.0.1 unless told otherwise: the usual setup puts a
TLS-terminating proxy or tunnel in front (the API delivers only to HTTPS),
and a receiver reachable from everywhere should be a deliberate choice.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from batcher.errors import ListenAddressError
from batcher.webhooks.receiver import WebhookReceiver

__all__ = ["DEFAULT_HOST", "ListenAddress", "parse_listen", "serve_receiver"]

DEFAULT_HOST = "127.0.0.1"
# In-flight deliveries get this long to finish when the receiver stops.
_SHUTDOWN_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A host and port to bind (port 0: any free port) or that was bound."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{_url_host(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """``http://HOST:PORT/``: where deliveries can be posted."""
        return f"http://{self}/"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_listen(text: str, *, option: str = "--webhook-listen") -> ListenAddress:
    """Read ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1).

    Raises :class:`ListenAddressError` naming ``option`` and what is wrong.
    """
    value = text.strip()
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ListenAddressError(f"{option} {text!r}: write an IPv6 address as [ADDR]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenAddressError(
                f"{option} {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in value:
        host, _, port_text = value.rpartition(":")
        if ":" in host:
            raise ListenAddressError(f"{option} {text!r}: write an IPv6 address as [ADDR]:PORT")
    else:
        host, port_text = "", value
    host = host.strip() or DEFAULT_HOST
    if any(ch.isspace() or ch in "/@" for ch in host):
        raise ListenAddressError(f"{option} {text!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenAddressError(
            f"{option} {text!r}: expected HOST:PORT with a port from 0 to 65535 (0: any free port)")
    return ListenAddress(host, int(port_text))


@asynccontextmanager
async def serve_receiver(
    host: str, port: int, receiver: WebhookReceiver
) -> AsyncIterator[ListenAddress]:
    """Serve ``receiver`` on ``host:port`` while the block runs; yields the bound address.

    ``port`` 0 picks a free port (the yielded address has the real one).
    Binding errors (port in use, unknown host) raise :class:`ListenAddressError`.
    Needs a running asyncio loop (anyio's asyncio backend included).
    """
    runner = web.AppRunner(receiver.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=_SHUTDOWN_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenAddressError(
                f"cannot receive webhooks on {ListenAddress(host, port)}: {exc.strerror or exc}"
            ) from None
        bound = runner.addresses[0]
        yield ListenAddress(host, int(bound[1]))
    finally:
        await runner.cleanup()

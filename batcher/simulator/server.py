"""Serving a :class:`Simulator` on a real TCP port, in-process.

``run_simulator`` is what tests and ``batcher run --simulate`` use; the
``batcher simulate`` command wraps it with signal handling (cli.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from batcher.simulator.app import Simulator
from batcher.simulator.config import SimConfig

__all__ = ["run_simulator"]

# In-flight requests (a latency sleep, a slow upload) get this long at exit.
_SHUTDOWN_SECONDS = 1.0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@asynccontextmanager
async def run_simulator(
    config: SimConfig | Simulator | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> AsyncIterator[Simulator]:
    """Serve a simulator on ``host:port`` (0 = a free port) while the block runs.

    Pass a :class:`SimConfig` (or None for the defaults) to get a fresh
    simulator, or a ready :class:`Simulator` to serve that one (``clock`` and
    ``wall`` then come from it). Yields the simulator with ``base_url`` set to
    ``http://HOST:PORT/v1``. Needs a running asyncio loop (anyio's asyncio
    backend included).
    """
    sim = config if isinstance(config, Simulator) else Simulator(config, clock=clock, wall=wall)
    runner = web.AppRunner(
        sim.app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_SECONDS
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        sim.base_url = f"http://{_url_host(host)}:{bound_port}/v1"
        yield sim
    finally:
        sim.base_url = None
        await runner.cleanup()

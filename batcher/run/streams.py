"""Taking from the run's memory streams without an extra trip round the loop."""

from __future__ import annotations

from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

__all__ = ["take"]

T = TypeVar("T")


async def take(recv: MemoryObjectReceiveStream[T]) -> T | None:
    """The next item, or None once the stream has ended.

    ``receive`` always yields to the event loop first, even with an item
    waiting: one more loop iteration per row on the hot path. An item
    already buffered is taken at once; the worker's next real wait (a
    request, a ledger write) is where cancellation lands.
    """
    try:
        return recv.receive_nowait()
    except anyio.WouldBlock:
        pass
    except anyio.EndOfStream:
        return None
    try:
        return await recv.receive()
    except anyio.EndOfStream:
        return None

"""Small pieces the API and the upload host share: reading a JSON body, rolling a fault."""

from __future__ import annotations

import json
import random
from typing import Any

from aiohttp import web

__all__ = ["json_object", "roll"]


async def json_object(request: web.Request) -> dict[str, Any] | None:
    """The request's JSON object; ``{}`` for an empty body, None when it is not one."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def roll(rng: random.Random, rate: float) -> bool:
    """True for a share ``rate`` of calls, drawn from ``rng``.

    No draw at rate 0, so turning a fault off keeps the other draws in step.
    """
    return rate > 0 and rng.random() < rate

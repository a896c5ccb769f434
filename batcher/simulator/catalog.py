"""Which models each API generation serves, and which generation serves a model.

Two generations of the Diffio API exist side by side in the simulator:

- ``seed``: diffio-3.5 (with diffio-3.4 as its alias) and the 2.0 models,
  one signed PUT per upload, no upload confirmation.
- ``current``: diffio-4.6-flash and diffio-4.6-pro (diffio-4.5-flash/-pro are
  hidden aliases of them), uploads in parts on an upload host, then
  ``complete_project_upload``. Every other ``diffio-…-generation`` endpoint
  answers 410 ``model_retired``.

Everything here is plain data and pure functions, so the runner can ask
:func:`api_for_model` without starting anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, get_args

__all__ = [
    "API_GENERATIONS",
    "CURRENT_MODELS",
    "MODEL_ENDPOINTS",
    "ApiGeneration",
    "api_for_model",
    "retired_model",
]

ApiGeneration = Literal["current", "seed"]
API_GENERATIONS: tuple[ApiGeneration, ...] = get_args(ApiGeneration)

#: The models the current API serves, in the order its 410 answers list them.
CURRENT_MODELS = ("diffio-4.6-flash", "diffio-4.6-pro")

#: Generation endpoint -> the modelKey it stores, per API generation. Aliases
#: store their target's key, so the same idempotency key on an alias and its
#: target is a replay, never a conflict.
MODEL_ENDPOINTS: Mapping[ApiGeneration, Mapping[str, str]] = {
    "seed": {
        "diffio-3.5-generation": "diffio-3.5",
        "diffio-3.4-generation": "diffio-3.5",
        "diffio-2.0-generation": "diffio-2",
        "diffio-2.0-flash-generation": "diffio-2-flash",
    },
    "current": {
        "diffio-4.6-flash-generation": "diffio-4.6-flash",
        "diffio-4.6-pro-generation": "diffio-4.6-pro",
        "diffio-4.5-flash-generation": "diffio-4.6-flash",
        "diffio-4.5-pro-generation": "diffio-4.6-pro",
    },
}

_MODEL_ENDPOINT = re.compile(r"(diffio-[A-Za-z0-9._-]+)-generation")
_MAJOR = re.compile(r"diffio-(\d+)")


def retired_model(api: ApiGeneration, endpoint: str) -> str | None:
    """The model key a retired generation endpoint names, or None.

    Only the current API retires models: there, any ``diffio-…-generation``
    endpoint it does not serve is retired. The seed API simply does not know
    endpoints it lacks (404).
    """
    if api != "current" or endpoint in MODEL_ENDPOINTS[api]:
        return None
    found = _MODEL_ENDPOINT.fullmatch(endpoint)
    return found.group(1) if found else None


def api_for_model(model_key: str) -> ApiGeneration:
    """The API generation that serves ``model_key``: 4.x and later current, older seed.

    Keys that do not name a Diffio version (a typo, a future naming scheme)
    go to the current API, which answers them as it answers any unknown
    model.
    """
    found = _MAJOR.match(model_key.strip().lower())
    if found is None:
        return "current"
    return "current" if int(found.group(1)) >= 4 else "seed"

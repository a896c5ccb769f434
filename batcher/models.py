"""The Diffio models batcher knows, in one place: served, aliased, retired.

Two generations of the Diffio API exist. Today's serves two models,
``diffio-4.6-flash`` (every plan; batcher's default) and ``diffio-4.6-pro``
(paid plans); the ``diffio-4.5-*`` names are hidden aliases of them, and
every other model endpoint answers 410 ``model_retired``. The seed-era API
served ``diffio-3.5`` (``diffio-3.4`` its alias) and the 2.0 models; a
deployment that still serves them keeps working with batcher.

An alias is the same request as its target: it derives the same idempotency
key, so a manifest that switches between ``diffio-4.5-flash`` and
``diffio-4.6-flash`` pays once. Generations posted with a retired model keep
their model key and can still be polled and downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ALIASES",
    "SUPPORTED_MODELS",
    "is_retired",
    "normalize_model",
]

#: The models the current API serves, in the order its 410 answers list them.
SUPPORTED_MODELS: tuple[str, ...] = ("diffio-4.6-flash", "diffio-4.6-pro")

#: The model a row uses when neither ``--model`` nor its ``model`` column names one.
DEFAULT_MODEL = SUPPORTED_MODELS[0]

#: Model names the API accepts for another model: it stores (and charges) the target.
MODEL_ALIASES: Mapping[str, str] = {
    "diffio-4.5-flash": "diffio-4.6-flash",
    "diffio-4.5-pro": "diffio-4.6-pro",
    "diffio-3.4": "diffio-3.5",
}


def normalize_model(model: str) -> str:
    """The model key the API stores for ``model`` (an alias gives its target)."""
    return MODEL_ALIASES.get(model, model)


def is_retired(model: str) -> bool:
    """Whether the current API answers ``model`` with 410 ``model_retired``.

    Every model but the 4.6 ones and their 4.5 aliases. (A seed-era
    deployment may still serve it: this is what the documentation says of
    today's service, and the dry run only warns.)
    """
    return normalize_model(model) not in SUPPORTED_MODELS

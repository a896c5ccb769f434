"""Turn one Diffio API answer into either its JSON object or an ``ApiError``.

:func:`classify` is pure: no network, no clock unless an HTTP-date
``Retry-After`` has to be turned into seconds (``now`` can be passed in).
It implements batcher's error taxonomy (see ``errors.py`` for the tree):

======================  ===================================================
answer                  result
======================  ===================================================
2xx, JSON object        the object (``dict``)
2xx, anything else      ``DecodeError`` (status and first bytes kept)
3xx                     ``RequestBug`` (halts: wrong base URL or a redirect
                        we must not follow with a POST)
400, 404, other 4xx     ``ClientError`` (body ``code`` or badRequest /
                        notFound / httpNNN)
401                     ``AuthError``
402                     ``SpendLimit`` (body figures kept)
403 on the key          ``AuthError`` (halts)
403 "does not own"      ``ClientError`` code ``notOwner`` (row fails)
405                     ``RequestBug`` (halts loudly: a bug in the runner)
408                     ``ServerError`` code ``requestTimeout`` (retryable)
409                     ``Conflict`` with the body's ``code``
410 ``model_retired``   ``ModelRetired`` (halts: the model is no longer
                        served; names the supported models)
429                     ``RateLimited`` with ``retry_after``
5xx                     ``ServerError``
anything else           ``DecodeError``
======================  ===================================================

An HTML page (a proxy's or load balancer's error page) on any status keeps
that status' class, with a message saying "HTML page" and its first 200
characters.

Error bodies come in two shapes: the API's ``{"error": "message", "code":
"…"}`` and the upload host's ``{"error": {"code": "…", "message": "…"}}``;
both give the same message and code (:func:`error_text`).

The 403 decision: the seed documents three 403 causes — key not active, key
lacks write permission, key does not own the project. Only the last is about
the row; the API's wording for it is "does not own the project". A 403 is
therefore a row failure (``notOwner``) only when its body says so (wording
"does not own" / "not the owner", or an ownership ``code``); every other 403
halts the run. Halting on an unrecognised 403 is the safe side: a halt is
resumable and costs nothing, while treating a key problem as a row problem
would mark every remaining row failed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import orjson

from batcher.errors import (
    ApiError,
    AuthError,
    ClientError,
    Conflict,
    DecodeError,
    ModelRetired,
    RateLimited,
    RequestBug,
    ServerError,
    SpendLimit,
)

__all__ = ["classify", "error_text", "parse_retry_after"]

_SNIPPET = 200

# Lower-cased body codes that mean "this key does not own that project".
_OWNERSHIP_CODES = frozenset({"notowner", "projectnotowned", "notprojectowner"})
# Lower-cased phrases of the ownership 403 (seed: "does not own the project").
_OWNERSHIP_WORDING = ("does not own", "not the owner")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value.

    Accepts delta-seconds (``"3"``, also ``"1.5"``) and an HTTP date (a date
    in the past gives ``0.0``). Anything else — empty, negative, not finite,
    unparseable — gives ``None``. ``now`` is the wall-clock time (Unix
    seconds) used for HTTP dates; default :func:`time.time`.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
        return None
    import email.utils  # an HTTP date is rare; the parser costs every run 2 ms to import

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; a zone-less parse means "-0000".
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def _snippet(body: bytes) -> str:
    return body[:_SNIPPET].decode("utf-8", errors="replace")


def _is_html(body: bytes, content_type: str | None) -> bool:
    if content_type and content_type.split(";", 1)[0].strip().lower() in (
        "text/html",
        "application/xhtml+xml",
    ):
        return True
    head = body[:64].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def error_text(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(message, code) of an error body in either shape, each None when absent.

    ``{"error": "msg", "code": "c"}`` (the API) and ``{"error": {"code": "c",
    "message": "msg"}}`` (the upload host); a top-level ``code`` wins over a
    nested one, a nested ``message`` is the message.
    """
    error = body.get("error")
    message: Any = error
    code: Any = body.get("code")
    if isinstance(error, Mapping):
        message = error.get("message")
        if not isinstance(code, str) or not code:
            code = error.get("code")
    return (message if isinstance(message, str) and message else None,
            code if isinstance(code, str) and code else None)


def _is_ownership_403(code: str | None, message: str | None, text: str) -> bool:
    if code is not None and code.lower() in _OWNERSHIP_CODES:
        return True
    haystack = (message if message is not None else text).lower()
    return any(phrase in haystack for phrase in _OWNERSHIP_WORDING)


def _model_retired(message: str, body: Mapping[str, Any], kw: dict[str, Any]) -> ModelRetired:
    """The 410 ``model_retired`` answer, as one line naming what to use instead."""
    retired = body.get("retiredModel")
    retired = retired if isinstance(retired, str) and retired else None
    listed = body.get("supportedModels")
    supported = tuple(m for m in listed if isinstance(m, str)) if isinstance(listed, list) else ()
    endpoint = str(kw.get("endpoint", ""))
    name = retired or endpoint.removesuffix("-generation") or "this model"
    line = f"the API has retired model {name}"
    if supported:
        line += f"; it serves {', '.join(supported)}: use --model {supported[0]}"
        line += " (or the rows' model column)"
    else:
        line += f" ({message})"
    return ModelRetired(line, retired_model=name, supported_models=supported,
                        code="model_retired", **kw)


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    endpoint: str,
    content_type: str | None,
    now: float | None = None,
) -> dict[str, Any] | ApiError:
    """Classify one HTTP answer of the Diffio API.

    Returns the decoded JSON object for a usable 2xx answer, else the
    ``ApiError`` (not raised) that the caller should raise. ``content_type``
    is the answer's ``Content-Type`` header or ``None``; ``now`` is the wall
    clock for HTTP-date ``Retry-After`` values (default: :func:`time.time`).
    """
    html = _is_html(body, content_type)
    if 200 <= status < 300:
        if html:
            return DecodeError(
                f"HTTP {status} answer is an HTML page, not JSON: {_snippet(body)!r}",
                status=status,
                body=_snippet(body),
                endpoint=endpoint,
            )
        obj = _json_object(body)
        if obj is None:
            what = "empty" if not body.strip() else "not a JSON object"
            return DecodeError(
                f"HTTP {status} answer is {what}: {_snippet(body)!r}",
                status=status,
                body=_snippet(body),
                endpoint=endpoint,
            )
        return obj

    parsed = None if html else _json_object(body)
    data: dict[str, Any] = parsed or {}
    text = _snippet(body)
    body_message, body_code = error_text(data)
    if html:
        message = f"HTTP {status}: HTML page instead of JSON: {text!r}"
    elif body_message is not None:
        message = body_message
    elif parsed is None and body.strip():
        message = f"HTTP {status}: {text!r}"
    else:
        message = f"Request failed with status {status}"
    kw: dict[str, Any] = {"status": status, "body": data, "endpoint": endpoint}

    if status == 401:
        return AuthError(message, code=body_code or "unauthorized", **kw)
    if status == 402:
        return SpendLimit(message, code=body_code or "spendLimitExceeded", **kw)
    if status == 403:
        if _is_ownership_403(body_code, body_message, text):
            return ClientError(message, code="notOwner", **kw)
        return AuthError(message, code=body_code or "forbidden", **kw)
    if status == 405:
        return RequestBug(message, code="methodNotAllowed", **kw)
    if status == 408:
        # The server gave up waiting for our request: nothing was done, and
        # the SDK retries it too.
        return ServerError(message, code=body_code or "requestTimeout", **kw)
    if status == 409:
        return Conflict(message, code=body_code or "conflict", **kw)
    if status == 410 and body_code == "model_retired":
        return _model_retired(message, data, kw)
    if status == 429:
        retry_after = parse_retry_after(_header(headers, "Retry-After"), now=now)
        return RateLimited(message, retry_after=retry_after, code=body_code or "rateLimited", **kw)
    if 300 <= status < 400:
        where = _header(headers, "Location") or "?"
        return RequestBug(
            f"HTTP {status} redirect to {where!r}: check the API base URL",
            code="unexpectedRedirect",
            **kw,
        )
    if status == 404:
        return ClientError(message, code=body_code or "notFound", **kw)
    if status == 400:
        return ClientError(message, code=body_code or "badRequest", **kw)
    if 400 <= status < 500:
        return ClientError(message, code=body_code or f"http{status}", **kw)
    if 500 <= status < 600:
        return ServerError(message, code=body_code or "serverError", **kw)
    return DecodeError(
        f"HTTP {status} is not a status this client understands: {text!r}",
        status=status,
        body=text,
        endpoint=endpoint,
    )

"""classify(): the table of how each answer is handled, row by row, plus the bad answers."""

from __future__ import annotations

import email.utils
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.classify import classify, error_text, parse_retry_after
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
    StatusError,
)

JSON = "application/json"
EP = "diffio-3.5-generation"


def run(
    status: int,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    content_type: str | None = JSON,
    now: float | None = None,
) -> dict[str, Any] | ApiError:
    data = raw if raw is not None else (b"" if body is None else orjson.dumps(body))
    return classify(
        status, headers or {}, data, endpoint=EP, content_type=content_type, now=now
    )


def err(status: int, body: Any = None, **kw: Any) -> ApiError:
    result = run(status, body, **kw)
    assert isinstance(result, ApiError), result
    assert result.endpoint == EP
    return result


# -- 200 -----------------------------------------------------------------------


def test_200_json_object_is_returned() -> None:
    body = {"generationId": "gen-1", "status": "queued", "idempotentReplay": True}
    assert run(200, body) == body


def test_200_without_json_content_type_still_parses_a_json_object() -> None:
    assert run(200, {"a": 1}, content_type=None) == {"a": 1}


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b'{"generationId": "gen-1", "sta', "not a JSON object"),  # cut JSON
        (b"[1, 2]", "not a JSON object"),
        (b'"queued"', "not a JSON object"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe garbage", "not a JSON object"),
    ],
)
def test_200_that_is_not_a_json_object_is_a_decode_error(raw: bytes, what: str) -> None:
    e = err(200, raw=raw)
    assert type(e) is DecodeError
    assert e.retryable and not e.halts_submissions
    assert e.http_status == 200
    assert what in e.message
    assert e.body == raw[:200].decode("utf-8", errors="replace")


def test_200_html_page_is_a_decode_error_saying_html() -> None:
    page = b"<!DOCTYPE html><html><body>" + b"Maintenance " * 50 + b"</body></html>"
    e = err(200, raw=page, content_type="text/html; charset=utf-8")
    assert type(e) is DecodeError
    assert "HTML page" in e.message
    assert "Maintenance" in e.message
    # first 200 characters only
    assert page[:200].decode() in e.message
    assert page[:250].decode() not in e.message


def test_html_is_recognised_by_its_bytes_when_the_type_lies() -> None:
    e = err(200, raw=b"\n  <html><p>oops</p></html>", content_type=JSON)
    assert "HTML page" in e.message


# -- the table -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "cls", "code", "retryable", "halts"),
    [
        (400, {"error": "Invalid JSON body."}, ClientError, "badRequest", False, None),
        (400, {"error": "bad key", "code": "invalidIdempotencyKey"}, ClientError,
         "invalidIdempotencyKey", False, None),
        (401, {"error": "Invalid API key."}, AuthError, "unauthorized", False, "run"),
        (402, {"error": "Spend limit exceeded for this API key.", "code": "spendLimitExceeded",
               "spendLimitUsd": 10, "usedUsd": 9.2}, SpendLimit, "spendLimitExceeded", False,
         "submissions"),
        (402, {"error": "Payment failed.", "code": "paymentFailed"}, SpendLimit,
         "paymentFailed", False, "submissions"),
        (403, {"error": "API key is not active."}, AuthError, "forbidden", False, "run"),
        (403, {"error": "API key lacks write permission."}, AuthError, "forbidden", False, "run"),
        (403, {"error": "API key does not own the project."}, ClientError, "notOwner",
         False, None),
        (403, {"error": "Forbidden", "code": "notOwner"}, ClientError, "notOwner", False, None),
        (404, {"error": "API project not found."}, ClientError, "notFound", False, None),
        (405, {"error": "Method not allowed"}, RequestBug, "methodNotAllowed", False, "run"),
        (409, {"error": "Idempotency key reused with another model.",
               "code": "idempotencyKeyConflict"}, Conflict, "idempotencyKeyConflict", False, None),
        (409, {"code": "generationNotComplete"}, Conflict, "generationNotComplete", False, None),
        (429, {"error": "Rate limit exceeded.", "code": "rateLimited"}, RateLimited,
         "rateLimited", True, None),
        (500, {"error": "Pricing is not configured."}, ServerError, "serverError", True, None),
        (502, {"error": "Bad gateway"}, ServerError, "serverError", True, None),
        (503, None, ServerError, "serverError", True, None),
        (504, None, ServerError, "serverError", True, None),
    ],
)
def test_design_table_row(
    status: int, body: Any, cls: type[StatusError], code: str, retryable: bool,
    halts: str | None,
) -> None:
    e = err(status, body)
    assert type(e) is cls
    assert isinstance(e, StatusError)
    assert e.status == status and e.http_status == status
    assert e.code == code
    assert e.retryable is retryable
    # None: the row's business; "submissions": post no more; "run": stop now.
    assert e.halts_submissions is (halts is not None)
    assert e.halts_run is (halts == "run")
    if isinstance(body, dict) and body.get("error"):
        assert e.message == body["error"]
        assert e.body == body
    else:
        assert e.message == f"Request failed with status {status}"
    assert e.to_record() == {"code": code, "message": e.message, "httpStatus": status}


def test_402_keeps_the_figures_for_the_operator() -> None:
    body = {"error": "Spend limit exceeded for this API key.", "code": "spendLimitExceeded",
            "currency": "USD", "spendLimitUsd": 10, "estimatedCostUsd": 1.5, "usedUsd": 9.2,
            "pendingUsd": 0, "periodEnd": "2026-02-15T00:00:00Z"}
    e = err(402, body)
    assert isinstance(e, SpendLimit)
    assert e.figures() == (
        "spendLimitUsd=10, usedUsd=9.2, pendingUsd=0, estimatedCostUsd=1.5, "
        "periodEnd=2026-02-15T00:00:00Z"
    )


def test_403_ownership_wording_is_case_insensitive_and_unknown_403_halts() -> None:
    assert err(403, {"error": "This key DOES NOT OWN the project proj-1"}).code == "notOwner"
    assert err(403, {"error": "Key is not the owner of this project"}).code == "notOwner"
    unknown = err(403, {"error": "Something else entirely"})
    assert type(unknown) is AuthError and unknown.halts_run
    assert type(err(403, None)) is AuthError
    # the key-level body code wins when it is not about ownership
    assert err(403, {"error": "revoked", "code": "keyRevoked"}).code == "keyRevoked"


def test_403_html_page_from_a_proxy_halts() -> None:
    e = err(403, raw=b"<html><h1>403 Forbidden</h1></html>", content_type="text/html")
    assert type(e) is AuthError
    assert "HTML page" in e.message


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [
        (502, ServerError, "serverError"),
        (503, ServerError, "serverError"),
        (429, RateLimited, "rateLimited"),
        (404, ClientError, "notFound"),
        (401, AuthError, "unauthorized"),
        (500, ServerError, "serverError"),
    ],
)
def test_html_error_page_keeps_the_status_class(
    status: int, cls: type[StatusError], code: str
) -> None:
    page = b"<html><head><title>" + str(status).encode() + b" Bad Gateway</title></head>" + (
        b"x" * 500
    )
    e = err(status, raw=page, content_type="text/html")
    assert type(e) is cls
    assert e.code == code
    assert "HTML page" in e.message
    assert page[:200].decode() in e.message
    assert "x" * 400 not in e.message


def test_non_json_error_body_is_kept_as_text() -> None:
    e = err(500, raw=b"upstream connect error", content_type="text/plain")
    assert type(e) is ServerError
    assert "upstream connect error" in e.message


def test_408_is_retryable() -> None:
    e = err(408, None)
    assert type(e) is ServerError and e.retryable and e.code == "requestTimeout"


@pytest.mark.parametrize("status", [410, 413, 415, 422, 451, 499])
def test_unknown_4xx_is_a_client_error(status: int) -> None:
    e = err(status, {"error": "nope"})
    assert type(e) is ClientError
    assert not e.retryable and not e.halts_submissions
    assert e.code == f"http{status}"


@pytest.mark.parametrize("status", [501, 505, 507, 520, 599])
def test_unknown_5xx_is_a_server_error(status: int) -> None:
    e = err(status, None)
    assert type(e) is ServerError and e.retryable


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_halts_and_names_the_location(status: int) -> None:
    e = err(status, None, headers={"Location": "https://elsewhere/v1/x"})
    assert type(e) is RequestBug and e.halts_run
    assert e.code == "unexpectedRedirect"
    assert "https://elsewhere/v1/x" in e.message


@pytest.mark.parametrize("status", [100, 199, 600, 999])
def test_status_outside_the_http_classes_is_a_decode_error(status: int) -> None:
    e = err(status, None)
    assert type(e) is DecodeError and e.http_status == status


# -- Retry-After ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-1", None),
        ("soon", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("1e999", None),
        (None, None),
    ],
)
def test_parse_retry_after_seconds_and_garbage(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    future = email.utils.formatdate(now + 42, usegmt=True)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after(future, now=now) == pytest.approx(42.0)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("Mon, 99 Foo 2024 99:99:99 GMT", now=now) is None


def test_429_carries_retry_after_from_the_header_any_case() -> None:
    now = 1_700_000_000.0
    for headers, expected in [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "5"}, 5.0),
        ({"Retry-After": email.utils.formatdate(now + 10, usegmt=True)}, 10.0),
        ({"Retry-After": "whenever"}, None),
        ({}, None),
    ]:
        e = err(429, {"error": "Rate limit exceeded.", "code": "rateLimited"},
                headers=headers, now=now)
        assert isinstance(e, RateLimited)
        assert e.retry_after == (None if expected is None else pytest.approx(expected))


@given(
    status=st.integers(min_value=0, max_value=1000),
    body=st.binary(max_size=300),
    ctype=st.sampled_from([None, JSON, "text/html", "text/plain", ""]),
    retry_after=st.text(max_size=40),
)
def test_classify_never_raises_and_returns_dict_only_for_2xx(
    status: int, body: bytes, ctype: str | None, retry_after: str
) -> None:
    result = classify(
        status, {"Retry-After": retry_after}, body, endpoint="x", content_type=ctype, now=0.0
    )
    if isinstance(result, dict):
        assert 200 <= status < 300
    else:
        assert isinstance(result, ApiError)
        if isinstance(result, RateLimited) and result.retry_after is not None:
            assert result.retry_after >= 0


# -- today's API: 410 model_retired, and the upload host's error shape ----------


def test_410_model_retired_halts_the_run_with_one_line_naming_what_to_use() -> None:
    body = {"error": "diffio-3.5 has been retired. Use diffio-4.6-flash or diffio-4.6-pro.",
            "code": "model_retired", "retiredModel": "diffio-3.5",
            "supportedModels": ["diffio-4.6-flash", "diffio-4.6-pro"]}
    e = err(410, body)
    assert isinstance(e, ModelRetired) and e.halts_run and e.halts_submissions
    assert not e.retryable and e.code == "model_retired" and e.status == 410
    assert (e.retired_model, e.supported_models) == (
        "diffio-3.5", ("diffio-4.6-flash", "diffio-4.6-pro"))
    line = str(e)
    assert "\n" not in line and "diffio-3.5" in line
    assert "diffio-4.6-flash, diffio-4.6-pro" in line and "--model diffio-4.6-flash" in line
    assert e.to_record()["httpStatus"] == 410


def test_410_without_the_list_still_names_the_model_and_other_410s_are_row_errors() -> None:
    e = err(410, {"error": "gone", "code": "model_retired"})
    assert isinstance(e, ModelRetired) and e.supported_models == ()
    assert "diffio-3.5" in str(e) and "gone" in str(e)  # the endpoint's model, the API's words
    other = err(410, {"error": "gone for good"})
    assert type(other) is ClientError and other.code == "http410" and not other.halts_run


@pytest.mark.parametrize("status, kind, code", [
    (401, AuthError, "invalid_token"), (404, ClientError, "no_such_upload"),
    (409, Conflict, "upload_completed"), (500, ServerError, "internal_error"),
])
def test_the_upload_hosts_error_shape_gives_the_same_message_and_code(
        status: int, kind: type[ApiError], code: str) -> None:
    e = err(status, {"error": {"code": code, "message": "what went wrong"}})
    assert type(e) is kind and e.code == code and e.message == "what went wrong"


def test_error_text_reads_both_shapes() -> None:
    assert error_text({"error": "msg", "code": "c"}) == ("msg", "c")
    assert error_text({"error": {"code": "c", "message": "msg"}}) == ("msg", "c")
    assert error_text({"error": {"message": "msg"}, "code": "top"}) == ("msg", "top")
    assert error_text({"error": {}, "code": 7}) == (None, None)
    assert error_text({}) == (None, None)

"""The webhook receiver: secret, signatures, events, de-duplication, HTTP.

Deliveries here are signed by hand (hmac + hashlib, following the Standard
Webhooks text), not by batcher's own signing code, so a wrong use of the
library on either side fails these tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import pickle
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.errors import ConfigError
from batcher.webhooks import (
    COUNTER_NAMES,
    DEFAULT_SECRET_ENV,
    Disposition,
    EventError,
    EventSink,
    EventStatus,
    EventType,
    GenerationEvent,
    ListenAddress,
    ListenAddressError,
    MemorySink,
    RefusalReason,
    VerificationError,
    Verifier,
    WebhookReceiver,
    WebhookSecret,
    WebhookSecretError,
    advances,
    load_secret,
    parse_listen,
    serve_receiver,
    signed_headers,
    status_rank,
    supersedes,
)
from batcher.webhooks.dedupe import RecentIds
from batcher.webhooks.signing import sign

pytestmark = pytest.mark.anyio

KEY = bytes(range(1, 25))  # 24 bytes, as Svix issues
SECRET_TEXT = "whsec_" + base64.b64encode(KEY).decode()
WALL0 = 1_790_000_000.0


class FakeWall:
    """A settable unix-seconds clock for the receiver."""

    def __init__(self, now: float = WALL0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hand_signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,`` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), computed by hand."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def hand_headers(message_id: str, timestamp: int, body: bytes, key: bytes = KEY,
                 prefix: str = "svix") -> dict[str, str]:
    return {f"{prefix}-id": message_id, f"{prefix}-timestamp": str(timestamp),
            f"{prefix}-signature": hand_signature(key, message_id, timestamp, body)}


def payload(generation: str = "gen-1", status: str = "complete", *, at: float = WALL0,
            event_id: str | None = None, **extra: Any) -> dict[str, Any]:
    kind = {"queued": "generation.queued", "processing": "generation.processing",
            "error": "generation.failed", "complete": "generation.completed"}[status]
    body = {"eventType": kind, "eventId": event_id or f"evt-{generation}-{status}",
            "createdAt": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "apiKeyId": "key_1", "apiProjectId": "proj-1", "generationId": generation,
            "status": status, "hasVideo": False, "modelKey": "diffio-4.6-flash",
            "error": "It broke." if status == "error" else None,
            "errorDetails": "Stage inference failed." if status == "error" else None}
    body.update(extra)
    return body


def encode(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


# -- the secret --------------------------------------------------------------


def test_secret_parses_whsec_text_and_hides_itself() -> None:
    secret = WebhookSecret.parse(SECRET_TEXT)
    assert secret.reveal_key() == KEY
    assert secret.reveal() == SECRET_TEXT
    assert WebhookSecret.parse(SECRET_TEXT.rstrip("=")) == secret  # padding optional
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert shown.count("***") == 1
        assert SECRET_TEXT[6:] not in shown
    with pytest.raises(TypeError):
        pickle.dumps(secret)


@pytest.mark.parametrize("text, why", [
    ("", "whsec_"),
    ("AQIDBAUG", "whsec_"),
    ("whsec_", "base64"),
    ("whsec_***not-base64***", "base64"),
    ("whsec_QUJD=x", "base64"),
    ("whsec_=", "base64"),
])
def test_secret_refuses_malformed_text_without_repeating_it(text: str, why: str) -> None:
    with pytest.raises(WebhookSecretError) as caught:
        WebhookSecret.parse(text, source="the environment variable HOOK")
    message = str(caught.value)
    assert "the environment variable HOOK" in message and why in message
    if len(text) > 6:
        assert text[6:] not in message


def test_load_secret_reads_the_default_or_a_named_variable() -> None:
    assert load_secret(environ={DEFAULT_SECRET_ENV: SECRET_TEXT}).reveal_key() == KEY
    assert load_secret("DIFFIO_HOOK", environ={"DIFFIO_HOOK": f"  {SECRET_TEXT}\n"}) \
        .reveal_key() == KEY


def test_load_secret_errors_name_the_variable_never_the_value() -> None:
    with pytest.raises(WebhookSecretError, match="BATCHER_WEBHOOK_SECRET") as missing:
        load_secret(environ={})
    assert isinstance(missing.value, ConfigError)
    with pytest.raises(WebhookSecretError, match="DIFFIO_HOOK"):
        load_secret("DIFFIO_HOOK", environ={"DIFFIO_HOOK": "   "})
    with pytest.raises(WebhookSecretError, match="DIFFIO_HOOK") as wrong:
        load_secret("DIFFIO_HOOK", environ={"DIFFIO_HOOK": "hunter2-plain-password"})
    assert "hunter2" not in str(wrong.value)
    # The secret itself where its variable's name belongs: said so, not echoed.
    with pytest.raises(WebhookSecretError, match="looks like the secret itself") as pasted:
        load_secret(SECRET_TEXT, environ={})
    assert SECRET_TEXT[6:] not in str(pasted.value)


# -- signing and verification ------------------------------------------------


def test_signature_is_the_standard_hmac_computed_by_hand() -> None:
    secret = WebhookSecret.parse(SECRET_TEXT)
    body = encode(payload())
    assert sign(secret, "msg_1", 1_790_000_123, body) == hand_signature(
        KEY, "msg_1", 1_790_000_123, body)
    assert signed_headers(secret, "msg_1", 1_790_000_123, body) == hand_headers(
        "msg_1", 1_790_000_123, body)


def test_verifier_checks_against_the_hand_computed_signature() -> None:
    verifier = Verifier(WebhookSecret(KEY), wall=FakeWall())
    body = encode(payload())
    ts = int(WALL0)
    delivery = verifier.verify(body, hand_headers("msg_a", ts, body))
    assert (delivery.message_id, delivery.timestamp) == ("msg_a", ts)
    # The Standard Webhooks header names, any case.
    named = {k.upper(): v for k, v in hand_headers("msg_a", ts, body, prefix="webhook").items()}
    assert verifier.verify(body, named).message_id == "msg_a"
    # Several entries (a secret rotation), unknown versions and junk are skipped.
    good = hand_signature(KEY, "msg_a", ts, body)
    other = hand_signature(b"another key!", "msg_a", ts, body)
    headers = hand_headers("msg_a", ts, body) | {
        "svix-signature": f"v2,{good[3:]} junk v1,%%%% {other} {good}"}
    assert verifier.verify(body, headers).message_id == "msg_a"


def _reason(verifier: Verifier, body: bytes, headers: Mapping[str, str]) -> RefusalReason:
    with pytest.raises(VerificationError) as caught:
        verifier.verify(body, headers)
    return caught.value.reason


def test_verifier_refuses_wrong_secret_tampering_and_reserialised_json() -> None:
    verifier = Verifier(WebhookSecret(KEY), wall=FakeWall())
    data = payload()
    body = encode(data)
    ts = int(WALL0)
    bad = RefusalReason.BAD_SIGNATURE
    assert _reason(verifier, body, hand_headers("m", ts, body, key=b"x" * 24)) is bad
    tampered = encode(data | {"status": "error", "eventType": "generation.failed"})
    assert _reason(verifier, tampered, hand_headers("m", ts, body)) is bad
    # Same JSON value, other bytes: the signature covers the bytes.
    spaced = json.dumps(data).encode()
    assert json.loads(spaced) == json.loads(body)
    assert _reason(verifier, spaced, hand_headers("m", ts, body)) is bad
    # Another id or timestamp than the one signed.
    signed = hand_headers("m", ts, body)
    assert _reason(verifier, body, signed | {"svix-id": "m2"}) is bad
    assert _reason(verifier, body, signed | {"svix-timestamp": str(ts + 1)}) is bad
    assert _reason(verifier, b"\xff\xfe" + body, hand_headers("m", ts, body)) is bad
    assert _reason(verifier, body, signed | {"svix-signature": "v1"}) is bad


@pytest.mark.parametrize("drop", ["svix-id", "svix-timestamp", "svix-signature"])
def test_verifier_refuses_missing_headers(drop: str) -> None:
    verifier = Verifier(WebhookSecret(KEY), wall=FakeWall())
    body = encode(payload())
    headers = hand_headers("m", int(WALL0), body)
    del headers[drop]
    assert _reason(verifier, body, headers) is RefusalReason.MISSING_HEADERS
    headers[drop] = "  "
    assert _reason(verifier, body, headers) is RefusalReason.MISSING_HEADERS


@pytest.mark.parametrize("value", ["1790000000.5", "-5", "soon", "1e9"])
def test_verifier_refuses_a_timestamp_that_is_not_unix_seconds(value: str) -> None:
    verifier = Verifier(WebhookSecret(KEY), wall=FakeWall())
    body = encode(payload())
    headers = hand_headers("m", int(WALL0), body) | {"svix-timestamp": value}
    assert _reason(verifier, body, headers) is RefusalReason.MISSING_HEADERS


def test_verifier_window_uses_the_injected_clock_and_tolerance() -> None:
    wall = FakeWall()
    body = encode(payload())
    ts = int(WALL0)
    headers = hand_headers("m", ts, body)
    verifier = Verifier(WebhookSecret(KEY), wall=wall)  # 5 minutes by default
    for offset in (-300, 0, 300):
        wall.now = WALL0 + offset
        assert verifier.verify(body, headers).timestamp == ts
    wall.now = WALL0 + 301
    assert _reason(verifier, body, headers) is RefusalReason.STALE_TIMESTAMP
    wall.now = WALL0 - 301
    assert _reason(verifier, body, headers) is RefusalReason.FUTURE_TIMESTAMP
    tight = Verifier(WebhookSecret(KEY), tolerance=10, wall=FakeWall(WALL0 + 11))
    assert _reason(tight, body, headers) is RefusalReason.STALE_TIMESTAMP
    # The window is checked before the signature: a stale forgery is stale.
    forged = hand_headers("m", ts, body, key=b"y" * 24)
    assert _reason(tight, body, forged) is RefusalReason.STALE_TIMESTAMP


def test_the_official_sdk_accepts_what_batcher_signs() -> None:
    diffio_client = pytest.importorskip("diffio.client")
    body = encode(payload())
    ts = int(time.time())
    headers = signed_headers(WebhookSecret(KEY), "msg_sdk", ts, body)
    event = diffio_client.WebhooksClient(None).verify_signature(
        payload=body, headers=headers, secret=SECRET_TEXT)
    assert (event.generationId, event.status) == ("gen-1", "complete")


# -- events -------------------------------------------------------------------


def test_event_parses_the_documented_example() -> None:
    body = (b'{"eventType":"generation.completed","eventId":"evt_123","createdAt":'
            b'"2026-01-28T12:34:56Z","apiKeyId":"key_123","apiProjectId":"proj_123",'
            b'"generationId":"gen_123","status":"complete","hasVideo":false,'
            b'"modelKey":"diffio-2","error":null,"errorDetails":null,"transcription":null}')
    event = GenerationEvent.from_json(body)
    assert event == GenerationEvent(
        event_type=EventType.COMPLETED, event_id="evt_123",
        created_at=datetime(2026, 1, 28, 12, 34, 56, tzinfo=UTC), api_key_id="key_123",
        generation_id="gen_123", status=EventStatus.COMPLETE, api_project_id="proj_123",
        has_video=False, model_key="diffio-2")
    assert event.terminal and event.api_status == "complete"
    assert GenerationEvent.from_json(event.to_json()) == event
    assert json.loads(event.to_json())["createdAt"] == "2026-01-28T12:34:56Z"


def test_a_failed_event_says_error_and_moves_a_row_to_failed() -> None:
    event = GenerationEvent.from_payload(payload(status="error", errorDetails={"stage": "x"}))
    assert event.status is EventStatus.ERROR and event.event_type is EventType.FAILED
    assert event.api_status == "failed" and event.terminal
    assert event.error == "It broke." and event.error_details == '{"stage":"x"}'


@pytest.mark.parametrize("field", ["eventType", "eventId", "createdAt", "apiKeyId",
                                   "generationId", "status"])
def test_event_requires_the_fields_the_sdk_requires(field: str) -> None:
    data = payload()
    del data[field]
    with pytest.raises(EventError) as caught:
        GenerationEvent.from_payload(data)
    assert caught.value.field == field and field in str(caught.value)
    assert caught.value.reason is RefusalReason.BAD_BODY and caught.value.http_status == 400


@pytest.mark.parametrize("change, field", [
    ({"eventType": "generation.deleted"}, "eventType"),
    ({"status": "failed"}, "status"),  # progress vocabulary, not the events'
    ({"status": "error"}, "status"),  # does not go with generation.completed
    ({"createdAt": "yesterday"}, "createdAt"),
    ({"generationId": 7}, "generationId"),
    ({"eventId": ""}, "eventId"),
    ({"hasVideo": "no"}, "hasVideo"),
    ({"apiProjectId": ["p"]}, "apiProjectId"),
])
def test_event_refuses_wrong_values_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(EventError) as caught:
        GenerationEvent.from_payload(payload() | change)
    assert caught.value.field == field


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"{"])
def test_event_refuses_bodies_that_are_not_a_json_object(body: bytes) -> None:
    with pytest.raises(EventError, match="JSON"):
        GenerationEvent.from_json(body)


def test_created_at_without_a_zone_is_utc_and_offsets_are_converted() -> None:
    naive = GenerationEvent.from_payload(payload(createdAt="2026-01-28T12:34:56"))
    shifted = GenerationEvent.from_payload(payload(createdAt="2026-01-28T14:34:56+02:00"))
    assert naive.created_at == shifted.created_at == datetime(2026, 1, 28, 12, 34, 56,
                                                              tzinfo=UTC)


def _event(status: str, at: float = WALL0, generation: str = "gen-1") -> GenerationEvent:
    return GenerationEvent.from_payload(payload(generation, status, at=at))


def test_newer_means_further_along_then_later_and_terminal_is_final() -> None:
    queued, processing = _event("queued", WALL0 + 5), _event("processing", WALL0 + 1)
    complete, error = _event("complete", WALL0 + 2), _event("error", WALL0 + 9)
    assert supersedes(queued, None)
    assert supersedes(processing, queued)  # status first, whatever the clocks say
    assert not supersedes(queued, processing)
    assert supersedes(complete, processing)
    assert not supersedes(error, complete) and not supersedes(complete, error)
    assert not supersedes(complete, complete)
    assert supersedes(_event("processing", WALL0 + 2), processing)
    assert not supersedes(_event("processing", WALL0), processing)
    assert advances(complete, "processing") and advances(queued, None)
    assert advances(error, "queued") and not advances(error, "failed")
    assert not advances(processing, "processing") and not advances(queued, "pending")
    assert advances(queued, "something new")
    assert [status_rank(s) for s in ("pending", "queued", "processing", "failed", "error",
                                     "complete", "?")] == [0, 0, 1, 2, 2, 2, -1]


# -- remembered message ids ----------------------------------------------------


def test_recent_ids_expire_with_their_window_and_stay_bounded() -> None:
    recent = RecentIds(capacity=3)
    recent.remember("a", until=100, now=0)
    recent.remember("b", until=50, now=0)
    assert recent.seen("a", now=100) and not recent.seen("a", now=100.5)
    assert recent.seen("b", now=10)
    recent.remember("b", until=20, now=10)  # a later sighting never shortens the window
    assert recent.seen("b", now=49)
    for name in "cdef":
        recent.remember(name, until=1000, now=60)
    assert len(recent) == 3 and not recent.seen("c", now=60)
    assert all(recent.seen(name, now=60) for name in "def")
    with pytest.raises(ValueError):
        RecentIds(0)


# -- listen addresses ------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ListenAddress("127.0.0.1", 8080)),
    ("0.0.0.0:9000", ListenAddress("0.0.0.0", 9000)),
    ("localhost:0", ListenAddress("localhost", 0)),
    (":8081", ListenAddress("127.0.0.1", 8081)),
    ("8082", ListenAddress("127.0.0.1", 8082)),
    ("[::1]:8083", ListenAddress("::1", 8083)),
    (" hooks.internal:65535 ", ListenAddress("hooks.internal", 65535)),
])
def test_parse_listen(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:http", "host:65536", "::1:80", "[::1]80",
                                  "[nothost]:80", "a b:80", "user@host:80", "host:-1"])
def test_parse_listen_errors_name_the_option(text: str) -> None:
    with pytest.raises(ListenAddressError, match="--webhook-listen") as caught:
        parse_listen(text)
    assert isinstance(caught.value, ConfigError)


def test_listen_address_formats_urls() -> None:
    assert ListenAddress("::1", 80).url == "http://[::1]:80/"
    assert str(ListenAddress("127.0.0.1", 8080)) == "127.0.0.1:8080"


# -- the receiver over HTTP --------------------------------------------------------


@dataclass
class Served:
    receiver: WebhookReceiver
    sink: Any
    url: str
    session: aiohttp.ClientSession
    wall: FakeWall

    async def post(self, body: bytes, headers: Mapping[str, str], path: str = "/",
                   method: str = "POST") -> tuple[int, Any]:
        async with self.session.request(method, self.url.rstrip("/") + path, data=body,
                                        headers=dict(headers)) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def deliver(self, data: Mapping[str, Any] | bytes, message_id: str,
                      path: str = "/", *, key: bytes = KEY) -> tuple[int, Any]:
        body = data if isinstance(data, bytes) else encode(data)
        return await self.post(body, hand_headers(message_id, int(self.wall()), body, key=key),
                               path)

    def counts(self) -> dict[str, Any]:
        return self.receiver.snapshot()


@asynccontextmanager
async def served(sink: EventSink | None = None, **options: Any) -> AsyncIterator[Served]:
    wall = options.pop("wall", None) or FakeWall()
    the_sink = sink if sink is not None else MemorySink()
    receiver = WebhookReceiver(WebhookSecret(KEY), the_sink, wall=wall, **options)
    async with serve_receiver("127.0.0.1", 0, receiver) as address, \
            aiohttp.ClientSession() as session:
        yield Served(receiver, the_sink, address.url, session, wall)


def assert_balanced(counts: Mapping[str, Any]) -> None:
    outcomes = (counts["recorded"] + counts["duplicates"] + counts["stale"] + counts["unknown"]
                + counts["sinkErrors"] + sum(counts["refused"].values()))
    assert counts["received"] == outcomes


async def test_a_signed_event_is_recorded_at_any_path() -> None:
    async with served() as srv:
        for n, path in enumerate(["/", "/hooks/diffio", "/a/b/c?token=x"]):
            status, body = await srv.deliver(payload(f"gen-{n}"), f"msg-{n}", path)
            assert (status, body) == (200, {"disposition": "recorded"})
        assert sorted(srv.sink.latest) == ["gen-0", "gen-1", "gen-2"]
        assert srv.counts()["recorded"] == 3 and srv.counts()["received"] == 3


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405_and_not_deliveries(method: str) -> None:
    async with served() as srv:
        body = encode(payload())
        async with srv.session.request(method, srv.url + "any/path", data=body,
                                       headers=hand_headers("m", int(WALL0), body)) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert srv.counts()["received"] == 0 and srv.sink.latest == {}


async def test_bodies_over_the_cap_are_413_whether_announced_or_streamed() -> None:
    async with served(max_body=1024) as srv:
        data = payload()
        body = encode(data)
        exact = body[:-1] + b" " * (1024 - len(body)) + b"}"  # signed as padded, byte for byte
        assert len(exact) == 1024
        assert (await srv.deliver(exact, "msg-exact"))[0] == 200
        big = exact + b" "
        status, answer = await srv.deliver(big, "msg-big")
        assert (status, answer["code"]) == (413, "tooLarge")

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b" " * 512

        async with srv.session.post(srv.url, data=chunks(),
                                    headers=hand_headers("msg-chunked", int(WALL0), b"")) as r:
            assert r.status == 413
        counts = srv.counts()
        assert counts["refused"]["tooLarge"] == 2 and counts["recorded"] == 1
        assert_balanced(counts)


async def test_refusals_answer_4xx_change_nothing_and_are_counted_by_reason() -> None:
    async with served() as srv:
        body = encode(payload())
        ts = int(WALL0)
        cases = [
            ({"svix-id": "m1", "svix-timestamp": str(ts)}, 400, "missingHeaders"),
            (hand_headers("m2", ts, body, key=b"z" * 24), 401, "badSignature"),
            (hand_headers("m3", ts - 301, body), 401, "staleTimestamp"),
            (hand_headers("m4", ts + 301, body), 401, "futureTimestamp"),
        ]
        for headers, status, code in cases:
            got, answer = await srv.post(body, headers)
            assert (got, answer["code"]) == (status, code)
        not_json = b"{not json"
        got, answer = await srv.post(not_json, hand_headers("m5", ts, not_json))
        assert (got, answer["code"]) == (400, "badBody")
        wrong = encode(payload(eventType="generation.exploded"))
        got, answer = await srv.post(wrong, hand_headers("m6", ts, wrong))
        assert (got, answer["code"]) == (400, "badBody") and "eventType" in answer["error"]
        counts = srv.counts()
        assert counts["refused"] == {"missingHeaders": 1, "badSignature": 1,
                                     "staleTimestamp": 1, "futureTimestamp": 1, "badBody": 2,
                                     "tooLarge": 0}
        assert counts["recorded"] == 0 and srv.sink.latest == {}
        assert_balanced(counts)
        assert tuple(counts) == COUNTER_NAMES


async def test_a_refused_copy_does_not_poison_the_genuine_message_id() -> None:
    async with served() as srv:
        genuine = encode(payload())
        ts = int(WALL0)
        tampered = encode(payload(status="error"))
        headers = hand_headers("msg-1", ts, genuine)
        assert (await srv.post(tampered, headers))[0] == 401
        assert (await srv.post(genuine, headers)) == (200, {"disposition": "recorded"})
        assert srv.sink.status_of("gen-1") == "complete"


async def test_duplicates_and_stale_events_answer_2xx_and_change_nothing() -> None:
    async with served() as srv:
        done = payload(status="complete", at=WALL0 + 3)
        assert (await srv.deliver(done, "msg-done"))[1] == {"disposition": "recorded"}
        assert (await srv.deliver(done, "msg-done"))[1] == {"disposition": "duplicate"}
        late = payload(status="processing", at=WALL0 + 1)
        assert (await srv.deliver(late, "msg-late"))[1] == {"disposition": "stale"}
        counts = srv.counts()
        assert (counts["recorded"], counts["duplicates"], counts["stale"]) == (1, 1, 1)
        assert srv.sink.status_of("gen-1") == "complete"


async def test_a_replay_is_a_duplicate_inside_the_window_and_refused_after_it() -> None:
    async with served() as srv:
        body = encode(payload())
        headers = hand_headers("msg-r", int(WALL0), body)
        assert (await srv.post(body, headers))[1] == {"disposition": "recorded"}
        srv.wall.now += 299
        assert (await srv.post(body, headers))[1] == {"disposition": "duplicate"}
        srv.wall.now += 2
        status, answer = await srv.post(body, headers)
        assert (status, answer["code"]) == (401, "staleTimestamp")
        assert len(srv.sink.recorded) == 1


async def test_unknown_generations_are_acknowledged_and_ignored() -> None:
    async with served(MemorySink(known={"gen-mine"})) as srv:
        status, answer = await srv.deliver(payload("gen-other"), "msg-x")
        assert (status, answer) == (200, {"disposition": "unknown"})
        assert (await srv.deliver(payload("gen-mine"), "msg-y"))[1]["disposition"] == "recorded"
        assert srv.counts()["unknown"] == 1 and list(srv.sink.latest) == ["gen-mine"]


class FlakySink:
    """Fails its first ``failures`` calls like a database that is down, then records."""

    def __init__(self, failures: int = 1, hang: bool = False) -> None:
        self.inner = MemorySink()
        self.failures = failures
        self.hang = hang
        self.calls = 0

    async def accept(self, event: GenerationEvent, message_id: str) -> Disposition:
        self.calls += 1
        if self.calls <= self.failures:
            if self.hang:
                await asyncio.sleep(3600)
            raise ConnectionError("ledger unreachable")
        return await self.inner.accept(event, message_id)


@pytest.mark.parametrize("hang", [False, True])
async def test_sink_trouble_is_503_and_the_retry_is_taken(hang: bool) -> None:
    sink = FlakySink(hang=hang)
    async with served(sink, sink_timeout=0.2) as srv:
        status, answer = await srv.deliver(payload(), "msg-1")
        assert status == 503 and answer["code"] == "unavailable"
        assert (await srv.deliver(payload(), "msg-1"))[1] == {"disposition": "recorded"}
        counts = srv.counts()
        assert (counts["sinkErrors"], counts["recorded"], counts["duplicates"]) == (1, 1, 0)
        assert sink.inner.status_of("gen-1") == "complete"


class SlowSink(MemorySink):
    """Holds every call until released, counting calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.release = asyncio.Event()

    async def accept(self, event: GenerationEvent, message_id: str) -> Disposition:
        self.calls += 1
        await self.release.wait()
        return await super().accept(event, message_id)


async def test_deliveries_of_one_id_at_once_reach_the_sink_once() -> None:
    sink = SlowSink()
    async with served(sink) as srv:
        tasks = [asyncio.create_task(srv.deliver(payload(), "msg-same")) for _ in range(5)]
        await asyncio.sleep(0.2)
        sink.release.set()
        answers = sorted(body["disposition"] for _, body in await asyncio.gather(*tasks))
        assert answers == ["duplicate"] * 4 + ["recorded"]
        assert sink.calls == 1


async def test_the_secret_never_appears_in_logs_answers_reprs_or_counters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = WebhookSecret(KEY)
    hidden = [SECRET_TEXT, SECRET_TEXT[6:], SECRET_TEXT[6:].rstrip("="), KEY.hex()]
    shown: list[str] = []
    async with served(FlakySink()) as srv:
        body = encode(payload())
        ts = int(WALL0)
        for headers in (hand_headers("a", ts, body), hand_headers("b", ts, body, key=b"q" * 24),
                        hand_headers("c", ts - 999, body), {"svix-id": SECRET_TEXT}):
            shown.append(repr(await srv.post(body, headers)))
        shown.append(repr(await srv.deliver(payload(), "d")))
        shown += [repr(srv.receiver), json.dumps(srv.counts()), repr(secret), str(secret),
                  repr(Verifier(secret))]
    for record in caplog.records:
        shown.append(record.getMessage())
        shown.extend(str(value) for value in record.__dict__.values())
    assert any("webhook.refused" in text for text in shown)
    assert any("webhook.sink_failed" in text for text in shown)
    for text in shown:
        for needle in hidden:
            assert needle not in text


async def test_serve_receiver_binds_loopback_and_reports_port_clashes() -> None:
    receiver = WebhookReceiver(WebhookSecret(KEY), MemorySink())
    address = parse_listen(":0")
    async with serve_receiver(address.host, address.port, receiver) as bound:
        assert bound.host == "127.0.0.1" and bound.port > 0
        with socket.create_connection(("127.0.0.1", bound.port), timeout=5):
            pass
        with pytest.raises(ListenAddressError, match=str(bound.port)):
            async with serve_receiver("127.0.0.1", bound.port, receiver):
                pass  # pragma: no cover - the bind fails


# -- any interleaving ends at the newest status ---------------------------------------

TIMELINE = ("queued", "processing", "complete")


@settings(max_examples=60, deadline=None)
@given(
    endings=st.lists(st.sampled_from(["complete", "error"]), min_size=2, max_size=2),
    order=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2)), min_size=1, max_size=14),
)
async def test_any_interleaving_leaves_each_generation_at_its_newest_status(
    endings: list[str], order: list[tuple[int, int]],
) -> None:
    """Duplicates and reorders of two generations' events, through the whole receiver."""
    wall = FakeWall()
    sink = MemorySink()
    receiver = WebhookReceiver(WebhookSecret(KEY), sink, wall=wall)
    events: dict[tuple[int, int], bytes] = {}
    for gen in (0, 1):
        for step, status in enumerate((*TIMELINE[:2], endings[gen])):
            # Later steps happen later, but the clocks of steps may also tie.
            events[gen, step] = encode(payload(f"gen-{gen}", status, at=WALL0 + step // 2))
    for gen, step in order:
        wall.now += 0.5
        body = events[gen, step]
        outcome = await receiver.receive(
            body, hand_headers(f"msg-{gen}-{step}", int(wall.now), body))
        assert outcome.status == 200
    for gen in (0, 1):
        delivered = [step for g, step in order if g == gen]
        if delivered:
            newest = (*TIMELINE[:2], endings[gen])[max(delivered)]
            assert sink.status_of(f"gen-{gen}") == newest
        else:
            assert sink.status_of(f"gen-{gen}") is None
    counts = receiver.snapshot()
    distinct = len(set(order))
    assert counts["duplicates"] == len(order) - distinct
    assert counts["recorded"] + counts["stale"] == distinct
    recorded_ids = [message_id for message_id, _ in sink.recorded]
    assert len(recorded_ids) == len(set(recorded_ids))


def test_event_timestamps_tie_breaks_are_strict() -> None:
    # Guards the property test's assumption: equal statuses at equal times are stale.
    first = _event("processing", WALL0)
    again = GenerationEvent.from_payload(payload(status="processing", at=WALL0,
                                                 event_id="evt-other"))
    assert not supersedes(again, first)
    later = GenerationEvent.from_payload(
        payload(status="processing", at=WALL0 + timedelta(milliseconds=1).total_seconds()))
    assert supersedes(later, first)

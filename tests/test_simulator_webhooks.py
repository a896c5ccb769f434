"""The simulator's webhook sender against the real receiver, both on loopback.

Every test runs a real :class:`WebhookReceiver` served by aiohttp and a
real :class:`WebhookSender` posting to it; faults come from a fixed seed, so
each run sees the same drops, duplicates and reorders.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import pytest
from fakeclock import FakeClock

from batcher.errors import ConfigError
from batcher.simulator import KeySpec, SimConfig, Simulator, run_simulator
from batcher.simulator.webhooks import (
    WEBHOOKS_WRITE,
    DeliveryKind,
    DeliveryRecord,
    EventSubject,
    WebhookFaults,
    WebhookSender,
    add_webhook_routes,
    api_key_id,
)
from batcher.webhooks import (
    Disposition,
    EventStatus,
    GenerationEvent,
    MemorySink,
    WebhookReceiver,
    WebhookSecret,
    serve_receiver,
    status_rank,
)

pytestmark = pytest.mark.anyio

KEY = bytes(range(100, 124))
SECRET = WebhookSecret(KEY)
OWNER = api_key_id("sim-key")
ENDINGS = ("complete", "failed")


def hand_signature(key: bytes, message_id: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class OffsetWall:
    """Real unix time plus an offset a test can move."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Pipeline:
    sender: WebhookSender
    receiver: WebhookReceiver
    sink: MemorySink
    url: str
    wall: OffsetWall

    def counts(self) -> dict[str, Any]:
        return self.receiver.snapshot()


@asynccontextmanager
async def pipeline(faults: WebhookFaults | None = None, *, seed: int = 1,
                   sink: Any = None, **sender_options: Any) -> AsyncIterator[Pipeline]:
    wall = OffsetWall()
    the_sink = sink if sink is not None else MemorySink()
    receiver = WebhookReceiver(SECRET, the_sink, wall=wall)
    options: dict[str, Any] = {"journal": 100_000, "backoff": 0.01} | sender_options
    async with serve_receiver("127.0.0.1", 0, receiver) as address, \
            WebhookSender(faults=faults, seed=seed, default_secret=SECRET, **options) as sender:
        sender.configure(address.url + "diffio/events")
        yield Pipeline(sender, receiver, the_sink, address.url, wall)


def plan(sender: WebhookSender, generations: int, *, start: float,
         step: float = 0.02) -> dict[str, list[GenerationEvent]]:
    """Each generation: queued, processing, then complete or failed, ``step`` apart."""
    timelines: dict[str, list[GenerationEvent]] = {}
    for n in range(generations):
        subject = EventSubject(f"gen-{n:03d}", f"proj-{n:03d}", OWNER, "diffio-4.6-flash")
        at = start + (n % 7) * step / 7
        events = []
        for offset, status in enumerate(("queued", "processing", ENDINGS[n % 5 == 0])):
            events.append(sender.schedule(subject, status, at + offset * step,
                                          error="It broke.", error_details="Stage inference."))
        timelines[subject.generation_id] = events
    return timelines


async def idle(sender: WebhookSender, seconds: float = 20.0) -> None:
    with anyio.fail_after(seconds):
        await sender.wait_idle()


def ok_records(sender: WebhookSender, *kinds: DeliveryKind) -> list[DeliveryRecord]:
    return [r for r in sender.journal if r.ok and r.kind in kinds]


# -- round trips -------------------------------------------------------------------


async def test_every_event_arrives_signed_and_recorded_once() -> None:
    async with pipeline() as p:
        timelines = plan(p.sender, 12, start=time.monotonic())
        await idle(p.sender)
        for generation, events in timelines.items():
            assert p.sink.status_of(generation) == events[-1].status.value
        counts = p.counts()
        assert counts["received"] == 36 and counts["duplicates"] == 0
        assert counts["recorded"] + counts["stale"] == 36
        assert sum(counts["refused"].values()) == 0
        stats = p.sender.stats.snapshot()
        assert (stats["scheduled"], stats["delivered"], stats["failed"]) == (36, 36, 0)
        assert stats["retries"] == 0 and stats["dropped"] == 0
        for record in p.sender.journal:
            # Checked by hand: the signing library used the right key, text and encoding.
            headers = record.headers
            assert headers["svix-signature"] == hand_signature(
                KEY, headers["svix-id"], headers["svix-timestamp"], record.body)
            assert abs(int(headers["svix-timestamp"]) - time.time()) < 60
            body = json.loads(record.body)
            assert body["eventId"] == record.event.event_id and body["apiKeyId"] == OWNER
        failed = [e for events in timelines.values() for e in events
                  if e.status is EventStatus.ERROR]
        assert failed and all(e.error == "It broke." and e.api_status == "failed"
                              for e in failed)
        assert all(r.url.endswith("/diffio/events") for r in p.sender.journal)


async def test_dropped_duplicated_and_reordered_events_leave_each_generation_at_its_newest(
) -> None:
    faults = WebhookFaults(drop=0.3, duplicate=1.0, reorder=1.0, delay=0.5, delay_max=0.05)
    async with pipeline(faults, seed=7) as p:
        timelines = plan(p.sender, 40, start=time.monotonic() + 0.01)
        await idle(p.sender)
        stats = p.sender.stats.snapshot()
        assert stats["scheduled"] == 120
        assert 0.15 * 120 < stats["dropped"] < 0.45 * 120
        assert stats["duplicated"] == 120 - stats["dropped"] == stats["delivered"]
        assert stats["reordered"] > 0 and stats["delayed"] > 0 and stats["failed"] == 0

        delivered = {r.message_id: r.event for r in
                     ok_records(p.sender, DeliveryKind.EVENT, DeliveryKind.DUPLICATE)}
        assert len(delivered) == stats["delivered"]
        # The sink saw each delivered message once, and nothing else.
        taken = [m for m, d in p.sink.outcomes if d in (Disposition.RECORDED, Disposition.STALE)]
        assert sorted(taken) == sorted(delivered)
        counts = p.counts()
        assert counts["duplicates"] == stats["duplicated"]
        assert counts["recorded"] + counts["stale"] == len(delivered)
        assert counts["stale"] > 0  # the reorders did reach the receiver out of order
        # Dropped events never appear; each generation stands at its newest delivered event.
        delivered_ids = {e.event_id for e in delivered.values()}
        for generation, events in timelines.items():
            arrived = [e for e in events if e.event_id in delivered_ids]
            newest = max(arrived, key=lambda e: status_rank(e.status), default=None)
            assert p.sink.status_of(generation) == (newest.status.value if newest else None)
            latest = p.sink.latest.get(generation)
            assert latest is None or latest.event_id in delivered_ids


async def test_reorder_holds_each_event_until_a_later_one_went_out() -> None:
    async with pipeline(WebhookFaults(reorder=1.0), workers=1) as p:
        timelines = plan(p.sender, 4, start=time.monotonic() + 0.01)
        await idle(p.sender)
        for generation in timelines:
            sent = [r.event.status.value for r in p.sender.journal
                    if r.event.generation_id == generation]
            assert sent == ["complete" if generation != "gen-000" else "error", "queued",
                            "processing"]
            assert p.sink.status_of(generation) == sent[0]
        assert p.sender.stats.reordered == 8 and p.counts()["stale"] == 8


@pytest.mark.parametrize("seed", range(6))
async def test_no_delivery_is_ever_stranded_whatever_the_faults_draw(seed: int) -> None:
    faults = WebhookFaults(drop=0.2, duplicate=0.5, reorder=0.7, delay=0.5, delay_max=0.03,
                           replay=0.2, replay_after=0.01)
    async with pipeline(faults, seed=seed) as p:
        timelines = plan(p.sender, 12, start=time.monotonic() + 0.01, step=0.005)
        await idle(p.sender)
        stats = p.sender.stats
        assert stats.delivered == stats.scheduled - stats.dropped and stats.failed == 0
        for generation, events in timelines.items():
            if p.sink.status_of(generation) is not None:
                assert p.sink.latest[generation].event_id in {e.event_id for e in events}


async def test_forged_tampered_replayed_and_skewed_deliveries_change_nothing() -> None:
    hostile = WebhookFaults(forged=1.0, tampered=1.0, replay=1.0, replay_after=0.05,
                            stale=0.5, future=0.5)
    async with pipeline(hostile, seed=3) as p:
        timelines = plan(p.sender, 15, start=time.monotonic() + 0.01)
        await idle(p.sender)
        stats = p.sender.stats.snapshot()
        counts = p.counts()
        for generation, events in timelines.items():
            assert p.sink.status_of(generation) == events[-1].status.value
        genuine_ids = {e.event_id for events in timelines.values() for e in events}
        assert {e.event_id for _, e in p.sink.recorded} <= genuine_ids
        assert counts["recorded"] + counts["stale"] == 45
        refused = counts["refused"]
        assert refused["badSignature"] == stats["forged"] + stats["tampered"] == 90
        assert refused["staleTimestamp"] == stats["staleSent"] > 0
        assert refused["futureTimestamp"] == stats["futureSent"] > 0
        assert counts["duplicates"] == stats["replayed"] == 45
        assert counts["received"] == stats["attempts"]
        replays = [r for r in p.sender.journal if r.kind is DeliveryKind.REPLAY]
        originals = {r.message_id: r for r in ok_records(p.sender, DeliveryKind.EVENT)}
        for replay in replays:  # byte for byte the delivery it replays
            original = originals[replay.message_id]
            assert (replay.body, replay.headers) == (original.body, original.headers)


async def test_an_old_delivery_replayed_after_the_window_is_refused_as_stale() -> None:
    async with pipeline() as p, aiohttp.ClientSession() as session:
        subject = EventSubject("gen-old", "proj-old", OWNER)
        p.sender.schedule(subject, "complete", time.monotonic())
        await idle(p.sender)
        (record,) = p.sender.journal
        p.wall.offset = 301.0
        async with session.post(p.url, data=record.body, headers=record.headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["code"] == "staleTimestamp"
        assert p.counts()["recorded"] == 1 and len(p.sink.recorded) == 1


# -- retries and closing ---------------------------------------------------------------


class DownFirst:
    """A sink whose first ``failures`` calls fail like a database that is down."""

    def __init__(self, failures: int) -> None:
        self.inner = MemorySink()
        self.failures = failures

    async def accept(self, event: GenerationEvent, message_id: str) -> Disposition:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("ledger down")
        return await self.inner.accept(event, message_id)


async def test_non_2xx_answers_are_retried_with_a_fresh_signature() -> None:
    sink = DownFirst(failures=2)
    async with pipeline(sink=sink) as p:
        p.sender.schedule(EventSubject("gen-r", "proj-r", OWNER), "complete", time.monotonic())
        await idle(p.sender)
        stats = p.sender.stats.snapshot()
        assert (stats["attempts"], stats["retries"], stats["delivered"]) == (3, 2, 1)
        assert [r.status for r in p.sender.journal] == [503, 503, 200]
        assert len({r.message_id for r in p.sender.journal}) == 1
        assert p.counts()["sinkErrors"] == 2 and sink.inner.status_of("gen-r") == "complete"


async def test_an_unreachable_endpoint_is_given_up_after_max_attempts() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with WebhookSender(default_secret=SECRET, max_attempts=3, backoff=0.01,
                             journal=10) as sender:
        sender.configure(f"http://127.0.0.1:{closed_port}/")
        sender.schedule(EventSubject("gen-x", "proj-x", OWNER), "queued", time.monotonic())
        await idle(sender)
        stats = sender.stats.snapshot()
        assert (stats["attempts"], stats["retries"], stats["failed"], stats["delivered"]) == (
            3, 2, 1, 0)
        assert all(r.status is None for r in sender.journal)


class CountingSink(MemorySink):
    """A memory sink that can be waited on until it has taken ``n`` events."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Condition()

    async def accept(self, event: GenerationEvent, message_id: str) -> Disposition:
        disposition = await super().accept(event, message_id)
        async with self._changed:
            self._changed.notify_all()
        return disposition

    async def wait_for(self, n: int, seconds: float = 10.0) -> None:
        with anyio.fail_after(seconds):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.outcomes) >= n)


async def test_events_go_out_when_the_injected_clock_reaches_them() -> None:
    clock = FakeClock()
    sink = CountingSink()
    async with pipeline(clock=clock, sink=sink) as p:
        later = EventSubject("gen-late", "proj", OWNER)
        sooner = EventSubject("gen-soon", "proj", OWNER)
        p.sender.schedule(later, "queued", 10.0)
        await anyio.sleep(0.05)  # the scheduler now sleeps until 10
        p.sender.schedule(sooner, "queued", 5.0)  # must wake it: due earlier
        await anyio.sleep(0.1)
        assert p.counts()["received"] == 0
        clock.advance(5.0)
        await sink.wait_for(1)
        assert list(p.sink.latest) == ["gen-soon"]
        await anyio.sleep(0.1)
        assert p.counts()["received"] == 1
        clock.advance(5.0)
        await idle(p.sender)
        assert sorted(p.sink.latest) == ["gen-late", "gen-soon"]


async def test_closing_stops_promptly_and_counts_what_was_left() -> None:
    started = time.monotonic()
    async with pipeline() as p:
        p.sender.schedule(EventSubject("gen-far", "proj", OWNER), "queued",
                          time.monotonic() + 3600)
        sender = p.sender
    assert time.monotonic() - started < 5
    assert sender.stats.abandoned == 1 and p.counts()["received"] == 0
    # A status change reported after the close is counted, not kept.
    sender.schedule(EventSubject("gen-after", "proj", OWNER), "queued", time.monotonic())
    assert sender.stats.abandoned == 2
    await sender.wait_idle()
    with pytest.raises(RuntimeError):
        async with sender:
            pass  # pragma: no cover - a sender runs once


# -- faults, seeds, endpoints ------------------------------------------------------------


def test_the_same_seed_draws_the_same_faults() -> None:
    faults = WebhookFaults(drop=0.3, duplicate=0.5, delay=0.5, reorder=0.5, forged=0.2)

    def run(seed: int) -> tuple[dict[str, int], list[str]]:
        sender = WebhookSender(faults=faults, seed=seed, default_secret=SECRET,
                               wall=lambda: 1_790_000_000.0)
        sender.configure("http://127.0.0.1:9/")
        events = [sender.schedule(EventSubject(f"g{n}", "p", OWNER), "queued", 0.0)
                  for n in range(50)]
        return sender.stats.snapshot(), [e.event_id for e in events]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_fault_knobs_are_validated() -> None:
    assert WebhookFaults.from_mapping({"drop": 0.3, "delay-max": 2}).delay_max == 2.0
    for bad in ({"drop": 1.5}, {"duplicate": -0.1}, {"delay_max": -1}, {"forged": "lots"},
                {"drop": math.nan}, {"explode": 0.1}, {"reorder": True}):
        with pytest.raises(ConfigError):
            WebhookFaults.from_mapping(bad)
    assert WebhookFaults().to_dict()["skew"] == 600.0


def test_endpoints_route_by_key_mode_and_event_type() -> None:
    sender = WebhookSender(default_secret=SECRET)
    mine = sender.configure("http://127.0.0.1:9/mine", api_key_id=OWNER,
                            event_types={GenerationEvent.from_payload(_sample()).event_type})
    sender.configure("http://127.0.0.1:9/test", api_key_id=OWNER, mode="test")
    again = sender.configure("http://127.0.0.1:9/moved", api_key_id=OWNER)
    assert again.endpoint_id == mine.endpoint_id and again.secret == SECRET
    assert len(sender.endpoints()) == 2
    assert SECRET.reveal() not in repr(again)
    sender.schedule(EventSubject("g", "p", OWNER), "queued", 0.0)
    sender.schedule(EventSubject("g", "p", api_key_id("someone-else")), "queued", 0.0)
    assert sender.stats.scheduled == 1  # only the owner's live endpoint
    with pytest.raises(ValueError):
        sender.configure("http://127.0.0.1:9/", mode="staging")


def _sample(**extra: Any) -> dict[str, Any]:
    return {"eventType": "generation.completed", "eventId": "evt", "createdAt":
            "2026-01-28T12:34:56Z", "apiKeyId": OWNER, "generationId": "g",
            "status": "complete"} | extra


# -- the admin routes, through the official SDK ----------------------------------------

ADMIN = "admin-key"


@asynccontextmanager
async def simulator_with_webhooks() -> AsyncIterator[tuple[Simulator, Pipeline]]:
    config = SimConfig(api_keys={"sim-key": KeySpec(), ADMIN: KeySpec(),
                                 "off-admin": KeySpec(active=False),
                                 "reader": KeySpec(write=False)})
    async with pipeline() as p:
        sim = Simulator(config)
        add_webhook_routes(sim.app, p.sender, sim.state,
                           {ADMIN: {WEBHOOKS_WRITE}, "off-admin": {WEBHOOKS_WRITE},
                            "reader": {"keys:read"}})
        async with run_simulator(sim) as served:
            yield served, p


async def _post(session: aiohttp.ClientSession, url: str, body: Any, key: str | None = ADMIN,
                method: str = "POST") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.request(method, url, data=data, headers=headers) as resp:
        return resp.status, await resp.json() if resp.status != 204 else None


async def test_configure_and_send_test_event_through_the_official_sdk() -> None:
    diffio = pytest.importorskip("diffio")
    async with simulator_with_webhooks() as (sim, p):
        client = diffio.DiffioClient(apiKey=ADMIN, baseUrl=sim.base_url)
        answer = await anyio.to_thread.run_sync(lambda: client.configure_webhook(
            mode="test", url=p.url + "from-sdk", eventTypes=["generation.failed"]))
        webhook = answer.webhook
        assert webhook["mode"] == "test" and webhook["url"] == p.url + "from-sdk"
        assert webhook["eventTypes"] == ["generation.failed"] and webhook["signing"] == "svix"
        assert webhook["apiKeyId"] == webhook["updatedByKeyId"] == api_key_id(ADMIN)
        assert WebhookSecret.parse(webhook["signingSecret"]) == SECRET  # the default secret
        sent = await anyio.to_thread.run_sync(lambda: client.send_webhook_test_event(
            eventType="generation.failed", mode="test",
            samplePayload={"generationId": "gen-sample", "error": "Sample failure."}))
        assert (sent.eventType, sent.mode, sent.apiKeyId) == (
            "generation.failed", "test", api_key_id(ADMIN))
        await idle(p.sender)
        assert p.sink.outcomes == [(sent.svixMessageId, Disposition.RECORDED)]
        event = p.sink.latest["gen-sample"]
        assert (event.event_id, event.status, event.error) == (
            sent.eventId, EventStatus.ERROR, "Sample failure.")
        # The official SDK verifies what the simulator signed.
        (record,) = p.sender.journal
        verified = client.webhooks.verify_signature(payload=record.body, headers=record.headers,
                                                    secret=SECRET.reveal())
        assert verified.generationId == "gen-sample" and verified.status == "error"


async def test_admin_routes_check_keys_scope_and_bodies() -> None:
    async with simulator_with_webhooks() as (sim, p), aiohttp.ClientSession() as session:
        configure = sim.base_url + "/webhooks/configure"
        send = sim.base_url + "/webhooks/send_test_event"
        good = {"mode": "live", "url": "https://hooks.example.invalid/diffio",
                "eventTypes": ["generation.completed"], "apiKeyId": "key_someone"}
        expectations = [
            (configure, good, None, 401, "invalidApiKey"),
            (configure, good, "nobody", 401, "invalidApiKey"),
            (configure, good, "off-admin", 403, "apiKeyInactive"),
            (configure, good, "sim-key", 403, "permissionDenied"),
            (configure, good, "reader", 403, "permissionDenied"),
            (configure, b"{not json", ADMIN, 400, "invalidJson"),
            (configure, good | {"mode": "prod"}, ADMIN, 400, "invalidMode"),
            (configure, good | {"url": "http://hooks.example.com/"}, ADMIN, 400, "invalidUrl"),
            (configure, good | {"url": "ftp://127.0.0.1/"}, ADMIN, 400, "invalidUrl"),
            (configure, good | {"url": "https://"}, ADMIN, 400, "invalidUrl"),
            (configure, good | {"eventTypes": []}, ADMIN, 400, "invalidEventTypes"),
            (configure, good | {"eventTypes": ["generation.deleted"]}, ADMIN, 400,
             "invalidEventTypes"),
            (configure, good | {"apiKeyId": ""}, ADMIN, 400, "invalidApiKeyId"),
            (send, {"eventType": "generation.exploded", "mode": "test"}, ADMIN, 400,
             "invalidEventType"),
            (send, {"eventType": "generation.queued", "mode": "x"}, ADMIN, 400, "invalidMode"),
            (send, {"eventType": "generation.queued", "mode": "test", "samplePayload": [1]},
             ADMIN, 400, "invalidSamplePayload"),
            (send, {"eventType": "generation.queued", "mode": "test"}, ADMIN, 404,
             "webhookNotConfigured"),
        ]
        for url, body, key, status, code in expectations:
            got = await _post(session, url, body, key)
            assert (got[0], got[1].get("code")) == (status, code), (body, key)
        status, answer = await _post(session, configure, good)
        assert status == 200 and answer["webhook"]["apiKeyId"] == "key_someone"
        assert answer["webhook"]["updatedByKeyId"] == api_key_id(ADMIN)
        local = good | {"url": "http://localhost:1/", "apiKeyId": None, "mode": "test"}
        assert (await _post(session, configure, local))[0] == 200
        status, answer = await _post(session, send, {
            "eventType": "generation.queued", "mode": "test",
            "samplePayload": {"status": "bogus"}})
        assert (status, answer["code"]) == (400, "invalidSamplePayload")
        assert "status" in answer["error"]
        assert (await _post(session, configure, good, method="GET"))[0] == 405
        assert (await _post(session, configure, good, method="OPTIONS"))[0] == 204
        # The rest of the API is untouched by the mount.
        status, answer = await _post(session, sim.base_url + "/list_projects", {}, "sim-key")
        assert (status, answer) == (200, {"projects": []})
        assert p.sender.stats.attempts == 0  # nothing was ever sent to the example host


async def test_attached_sender_delivers_a_keys_generations_to_the_endpoint_its_admin_set(
        ) -> None:
    from batcher.simulator.webhooks import attach_webhooks

    config = SimConfig(api_keys={"sim-key": KeySpec(), ADMIN: KeySpec()},
                       auto_create_projects=True, duration=(0.05, 0.1))
    async with pipeline() as p:
        sim = Simulator(config)
        attach_webhooks(sim, p.sender, {ADMIN: {WEBHOOKS_WRITE}})
        async with run_simulator(sim) as served, aiohttp.ClientSession() as session:
            base = str(served.base_url)
            status, answer = await _post(session, base + "/webhooks/configure", {
                "mode": "live", "url": p.url + "per-key", "apiKeyId": api_key_id("sim-key"),
                "eventTypes": ["generation.processing", "generation.completed"]})
            assert status == 200, answer
            status, created = await _post(session, base + "/diffio-4.6-flash-generation",
                                          {"apiProjectId": "proj-1"}, key="sim-key")
            assert status == 200, created
            generation = created["generationId"]
            await anyio.sleep(0.3)  # the generation ends after 0.05-0.1 s
            await idle(p.sender)
            assert p.sink.status_of(generation) == "complete"
            # The per-key endpoint got only the event types it asked for.
            per_key = [r.event.event_type.value for r in ok_records(p.sender, DeliveryKind.EVENT)
                       if r.url.endswith("per-key")]
            assert per_key == ["generation.processing", "generation.completed"]
            assert all(r.event.api_key_id == api_key_id("sim-key") for r in p.sender.journal)
            async with session.get(served.base_url.removesuffix("/v1") + "/_sim/webhooks"
                                   ) as resp:
                counters = await resp.json()
            # queued, processing, complete to the catch-all; two of them to the per-key one
            assert counters["sender"]["scheduled"] == 5 and counters["endpoints"] == 2

"""The simulator's webhook sender: signed generation events, with faults.

The simulator tells the sender about each status change of a generation and
the clock time at which it takes effect (:meth:`WebhookSender.schedule`);
the sender signs the event as Svix does and POSTs it to every endpoint that
wants it once the injected clock reaches that time.

One scheduler task holds a heap of (due time, delivery), never a sleeping
task per event, and hands what is due to a few workers that POST. A delivery
that is not answered 2xx (or not answered at all) goes back on the heap with
a doubling backoff, re-signed with a fresh timestamp under the same message
id, as Svix retries; after ``max_attempts`` it is given up and counted
``failed``. Fault copies (forged, tampered, replayed, stale, future) are
sent once: they are meant to be refused.

Routing: generation events go to ``live`` endpoints of the generation's API
key id and to endpoints configured for every key (``api_key_id=None``, what
``--webhook-url`` sets up); ``test`` endpoints only get
:meth:`WebhookSender.send_test` events.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType

import aiohttp
import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batcher.clock import Clock, SystemClock
from batcher.simulator.webhooks.faults import WebhookFaults
from batcher.simulator.webhooks.records import (
    MODES,
    DeliveryKind,
    DeliveryRecord,
    EventSubject,
    SenderStats,
    WebhookEndpoint,
)
from batcher.webhooks.events import TYPE_OF, EventStatus, EventType, GenerationEvent
from batcher.webhooks.secret import WebhookSecret
from batcher.webhooks.signing import signed_headers

__all__ = ["WebhookSender"]

_GENUINE = frozenset({DeliveryKind.EVENT, DeliveryKind.DUPLICATE, DeliveryKind.TEST})
# Deliveries whose order among a generation's events the reorder fault looks at.
_ORDERED = frozenset({DeliveryKind.EVENT, DeliveryKind.DUPLICATE})


@dataclass(slots=True, eq=False)
class _Delivery:
    endpoint: WebhookEndpoint
    event: GenerationEvent
    message_id: str
    kind: DeliveryKind
    hold: bool = False  # the reorder fault: wait for the generation's next event
    replay: bool = False  # the replay fault: send these exact bytes again later
    attempt: int = 0
    body: bytes | None = None  # fixed bytes and headers: a replay
    headers: dict[str, str] | None = None

    @property
    def order_key(self) -> tuple[str, str]:
        return (self.endpoint.endpoint_id, self.event.generation_id)


class WebhookSender:
    """Delivers signed generation events; use it as an async context manager.

    ``clock`` decides when events are due (the simulator's clock); ``wall``
    gives unix seconds for signatures. ``seed`` drives ids and every fault
    draw. ``session`` may be shared (else one is made and closed). ``journal``
    keeps the last N attempts as :class:`DeliveryRecord` (0: none).
    """

    def __init__(
        self,
        *,
        faults: WebhookFaults | None = None,
        seed: int = 0,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
        session: aiohttp.ClientSession | None = None,
        default_secret: WebhookSecret | None = None,
        workers: int = 4,
        max_attempts: int = 5,
        backoff: float = 0.1,
        backoff_cap: float = 5.0,
        timeout: float = 5.0,
        journal: int = 0,
    ) -> None:
        self.faults = faults if faults is not None else WebhookFaults()
        self.default_secret = default_secret
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.stats = SenderStats()
        self.journal: deque[DeliveryRecord] = deque(maxlen=max(journal, 0))
        self._rng = random.Random(seed)
        self._forger = WebhookSecret.generate(self._rng.randbytes)  # the third party's own
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._wall = wall
        self._session = session
        self._own_session = session is None
        self._workers = max(1, workers)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._endpoints: dict[tuple[str | None, str], WebhookEndpoint] = {}
        self._heap: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        # (endpoint, generation) -> event id -> genuine deliveries of it still on the heap
        self._pending: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self._held: dict[tuple[str, str], list[_Delivery]] = {}
        self._outstanding = 0
        self._wake: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (f"WebhookSender(endpoints={len(self._endpoints)}, pending={self._outstanding},"
                f" delivered={self.stats.delivered})")

    # -- endpoints -------------------------------------------------------------

    def configure(
        self,
        url: str,
        *,
        secret: WebhookSecret | None = None,
        api_key_id: str | None = None,
        mode: str = "live",
        event_types: Collection[EventType] | None = None,
        updated_by_key_id: str | None = None,
    ) -> WebhookEndpoint:
        """Add or replace the endpoint of (``api_key_id``, ``mode``).

        The secret is, in order: ``secret``; the replaced endpoint's (Svix
        keeps an endpoint's secret when it is edited); ``default_secret``; a
        fresh one.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        old = self._endpoints.get((api_key_id, mode))
        chosen = (secret or (old.secret if old else None) or self.default_secret
                  or WebhookSecret.generate(self._rng.randbytes))
        endpoint = WebhookEndpoint(
            url=url, secret=chosen,
            event_types=frozenset(event_types) if event_types else frozenset(EventType),
            api_key_id=api_key_id, mode=mode,
            endpoint_id=old.endpoint_id if old else self.new_id("ep"),
            updated_by_key_id=updated_by_key_id,
            updated_at=_iso(self._wall()),
        )
        self._endpoints[(api_key_id, mode)] = endpoint
        return endpoint

    def endpoints(self) -> list[WebhookEndpoint]:
        """Every endpoint configured."""
        return list(self._endpoints.values())

    def _targets(self, key_id: str, mode: str, event_type: EventType) -> list[WebhookEndpoint]:
        return [ep for ep in self._endpoints.values() if ep.wants(key_id, mode, event_type)]

    # -- what the simulator calls ------------------------------------------------

    def schedule(
        self,
        subject: EventSubject,
        status: str,
        at: float,
        *,
        error: str | None = None,
        error_details: str | None = None,
    ) -> GenerationEvent:
        """Plan the event "``subject`` reached ``status`` at clock time ``at``".

        ``status`` is ``queued``, ``processing``, ``complete`` or ``failed``
        (``error`` also works); ``error``/``error_details`` go with a failure.
        Every matching ``live`` endpoint gets a delivery, subject to the
        faults. Returns the event (with ``createdAt`` the wall time of ``at``).
        """
        event_status = EventStatus("error" if status == "failed" else status)
        kind = TYPE_OF[event_status]
        created = self._wall() + (at - self._clock.now())
        failed = event_status is EventStatus.ERROR
        event = GenerationEvent(
            event_type=kind, event_id=self.new_id("evt"),
            created_at=datetime.fromtimestamp(created, UTC),
            api_key_id=subject.api_key_id, generation_id=subject.generation_id,
            status=event_status, api_project_id=subject.api_project_id,
            has_video=subject.has_video, model_key=subject.model_key,
            error=(error or "Generation failed.") if failed else None,
            error_details=error_details if failed else None,
        )
        message_id = self.new_id("msg")
        for endpoint in self._targets(subject.api_key_id, "live", kind):
            self._plan(endpoint, event, message_id, at)
        return event

    def send_test(self, event: GenerationEvent, *, mode: str) -> str:
        """Deliver ``event`` now to the endpoints of its key in ``mode``, without faults.

        Returns the message id; raises LookupError when no endpoint wants it.
        """
        targets = self._targets(event.api_key_id, mode, event.event_type)
        if not targets:
            raise LookupError("no webhook endpoint is configured for this key and mode")
        message_id = self.new_id("msg")
        for endpoint in targets:
            self.stats.test_sent += 1
            self._add(_Delivery(endpoint, event, message_id, DeliveryKind.TEST), self._clock.now())
        return message_id

    def _plan(self, endpoint: WebhookEndpoint, event: GenerationEvent, message_id: str,
              at: float) -> None:
        faults, stats = self.faults, self.stats
        stats.scheduled += 1
        if self._roll(faults.drop):
            stats.dropped += 1
            stats.dropped_terminal += event.terminal
            return
        due = at
        if self._roll(faults.delay):
            stats.delayed += 1
            due += self._rng.uniform(0.0, faults.delay_max)
        genuine = _Delivery(endpoint, event, message_id, DeliveryKind.EVENT,
                            hold=self._roll(faults.reorder))
        copies: list[tuple[_Delivery, float]] = []
        if self._roll(faults.duplicate):
            stats.duplicated += 1
            copies.append((_Delivery(endpoint, event, message_id, DeliveryKind.DUPLICATE),
                           at + self._rng.uniform(0.0, faults.delay_max)))
        genuine.replay = self._roll(faults.replay)
        if self._roll(faults.forged):
            stats.forged += 1
            copies.append((_Delivery(endpoint, _forge(event, self.new_id("evt")),
                                     self.new_id("msg"), DeliveryKind.FORGED), due))
        if self._roll(faults.tampered):
            # Before the genuine one: a receiver that remembered the id of a refused
            # delivery would then drop the genuine event as a duplicate.
            stats.tampered += 1
            self._add(_Delivery(endpoint, event, message_id, DeliveryKind.TAMPERED), due)
        for kind, share in ((DeliveryKind.STALE, faults.stale), (DeliveryKind.FUTURE,
                                                                 faults.future)):
            if self._roll(share):
                if kind is DeliveryKind.STALE:
                    stats.stale_sent += 1
                else:
                    stats.future_sent += 1
                copies.append((_Delivery(endpoint, event, self.new_id("msg"), kind), due))
        self._add(genuine, due)
        for copy, copy_due in copies:
            self._add(copy, copy_due)

    def _roll(self, share: float) -> bool:
        # No draw for a fault that is off, so turning one off keeps the others in step.
        return share > 0 and self._rng.random() < share

    def new_id(self, prefix: str) -> str:
        """A fresh id such as ``msg_…`` or ``evt_…`` from the seeded source."""
        return f"{prefix}_{self._rng.getrandbits(112):028x}"

    # -- the heap ------------------------------------------------------------------

    def _add(self, delivery: _Delivery, due: float) -> None:
        if self._closed:
            # The simulator may still report status changes while it shuts down.
            self.stats.abandoned += 1
            return
        self._outstanding += 1
        self._push(delivery, due)

    def _push(self, delivery: _Delivery, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), delivery))
        if delivery.kind in _ORDERED:
            self._pending[delivery.order_key][delivery.event.event_id] += 1
        if self._wake is not None:
            self._wake.set()

    def _release(self, delivery: _Delivery) -> list[_Delivery]:
        """What goes out now that ``delivery`` is due: nothing (held), it, or it and the held.

        A held delivery waits for a delivery of another event of its generation
        (to the same endpoint) and goes out right after it.
        """
        key, event_id = delivery.order_key, delivery.event.event_id
        pending = self._pending[key]
        if delivery.kind in _ORDERED:
            pending[event_id] -= 1
            if pending[event_id] <= 0:
                del pending[event_id]
        if delivery.hold:
            delivery.hold = False
            if any(other != event_id for other in pending):
                self.stats.reordered += 1
                self._held.setdefault(key, []).append(delivery)
                return []
        ready = [delivery]
        if delivery.kind in _ORDERED and key in self._held:
            # Copies of this same event stay held while another event is still to come;
            # with nothing left to come, everything held goes (none is ever stranded).
            others_to_come = any(other != event_id for other in pending)
            kept: list[_Delivery] = []
            for held in self._held.pop(key):
                same = held.event.event_id == event_id
                (kept if same and others_to_come else ready).append(held)
            if kept:
                self._held[key] = kept
        if not pending:
            del self._pending[key]
        return ready

    def _finish(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until every planned delivery was made or given up (retries included).

        Only while the sender runs (inside ``async with``): nothing moves otherwise.
        """
        while self._outstanding:
            self._idle = anyio.Event()
            if self._outstanding:
                await self._idle.wait()

    # -- running -------------------------------------------------------------------

    async def __aenter__(self) -> WebhookSender:
        if self._closed or self._tg is not None:
            raise RuntimeError("a WebhookSender runs once")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        send, receive = anyio.create_memory_object_stream[_Delivery](self._workers)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._scheduler, send)
        for _ in range(self._workers):
            self._tg.start_soon(self._worker, receive.clone())
        receive.close()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Stop: what is still planned is abandoned (counted), the session closed."""
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            # The block's own exception is not the task group's business: it propagates
            # unchanged rather than wrapped in an exception group.
            await self._tg.__aexit__(None, None, None)
        finally:
            self._tg = None
            self._closed = True
            self._wake = None
            self.stats.abandoned += self._outstanding
            self._outstanding = 0
            self._heap.clear()
            self._held.clear()
            self._pending.clear()
            if self._own_session and self._session is not None:
                await self._session.close()
                self._session = None

    async def _scheduler(self, send: MemoryObjectSendStream[_Delivery]) -> None:
        async with send:
            while True:
                # A fresh event before looking at the heap: a schedule() from now on wakes us.
                wake = self._wake = anyio.Event()
                now = self._clock.now()
                while self._heap and self._heap[0][0] <= now:
                    _, _, delivery = heapq.heappop(self._heap)
                    for ready in self._release(delivery):
                        await send.send(ready)
                if self._heap:
                    await self._sleep_or_wake(self._heap[0][0] - now, wake)
                else:
                    await wake.wait()

    async def _sleep_or_wake(self, seconds: float, wake: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            async def sleep() -> None:
                await self._clock.sleep(seconds)
                tg.cancel_scope.cancel()

            async def woken() -> None:
                await wake.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(sleep)
            tg.start_soon(woken)

    async def _worker(self, receive: MemoryObjectReceiveStream[_Delivery]) -> None:
        async with receive:
            async for delivery in receive:
                await self._post(delivery)

    async def _post(self, delivery: _Delivery) -> None:
        body, headers = self._render(delivery)
        delivery.attempt += 1
        self.stats.attempts += 1
        status = await self._send(delivery.endpoint.url, body, headers)
        if status is not None:
            answered = self.stats.answered
            answered[delivery.kind.value] = answered.get(delivery.kind.value, 0) + 1
        record = DeliveryRecord(delivery.message_id, delivery.kind, delivery.event,
                                delivery.endpoint.url, delivery.attempt, status, body, headers)
        self.journal.append(record)
        genuine = delivery.kind in _GENUINE
        if genuine and not record.ok and delivery.attempt < self.max_attempts:
            self.stats.retries += 1
            wait = min(self.backoff_cap, self.backoff * 2 ** (delivery.attempt - 1))
            self._push(delivery, self._clock.now() + wait)
            return
        if genuine and not record.ok:
            self.stats.failed += 1
        elif delivery.kind is DeliveryKind.EVENT:
            self.stats.delivered += 1
        if record.ok and delivery.replay:
            self.stats.replayed += 1
            self._add(_Delivery(delivery.endpoint, delivery.event, delivery.message_id,
                                DeliveryKind.REPLAY, body=body, headers=headers),
                      self._clock.now() + self.faults.replay_after)
        self._finish()

    def _render(self, delivery: _Delivery) -> tuple[bytes, dict[str, str]]:
        if delivery.body is not None and delivery.headers is not None:
            return delivery.body, delivery.headers
        now = int(self._wall())
        body = delivery.event.to_json()
        secret = delivery.endpoint.secret
        kind = delivery.kind
        if kind is DeliveryKind.FORGED:
            secret = self._forger
        elif kind is DeliveryKind.STALE:
            now -= int(self.faults.skew)
        elif kind is DeliveryKind.FUTURE:
            now += int(self.faults.skew)
        headers = signed_headers(secret, delivery.message_id, now, body)
        if kind is DeliveryKind.TAMPERED:
            body = _forge(delivery.event, delivery.event.event_id).to_json()
        return body, headers

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> int | None:
        assert self._session is not None
        try:
            async with self._session.post(
                url, data=body, timeout=self._timeout,
                headers={**headers, "Content-Type": "application/json",
                         "User-Agent": "batcher-simulator-webhooks"},
            ) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return None


def _forge(event: GenerationEvent, event_id: str) -> GenerationEvent:
    """The event with the opposite ending: a failure claimed (or a success, for a failure)."""
    if event.status is EventStatus.ERROR:
        return replace(event, event_id=event_id, event_type=EventType.COMPLETED,
                       status=EventStatus.COMPLETE, error=None, error_details=None)
    return replace(event, event_id=event_id, event_type=EventType.FAILED,
                   status=EventStatus.ERROR, error="Forged failure.",
                   error_details="Sent by someone without the endpoint's secret.")


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


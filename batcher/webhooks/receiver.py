"""The webhook receiver: verify, de-duplicate, parse, hand to the sink, answer.

Per ``POST`` delivery, at any path (the API lets the user choose the URL,
and a proxy may add a prefix)::

    method ≠ POST           405 (not a delivery, not counted)
    body > max_body         413 tooLarge
    signing headers         400 missingHeaders
    timestamp window        401 staleTimestamp / futureTimestamp
    signature (raw bytes)   401 badSignature
    message id seen         200 duplicate
    event JSON              400 badBody
    sink.accept             200 recorded / stale / unknown / duplicate
    sink raised, timed out  503: the sender delivers it again later

A message id is remembered only after its delivery verified *and* the sink
took it: a forged or tampered copy that borrows a genuine id must not make
the genuine delivery look like a duplicate, and an event the sink could not
record must be taken when the sender retries it. Deliveries of one id that
arrive together are handled one after the other.

The answer comes as soon as the sink returns, which for a ledger is one
(group) commit: the sender wants 2xx quickly, and a slow answer is retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from batcher.errors import DeliveryRefused, RefusalReason
from batcher.ops.logs import WEBHOOK_ACCEPTED, WEBHOOK_REFUSED, WEBHOOK_SINK_FAILED
from batcher.ops.logs import event as log_event
from batcher.webhooks.dedupe import RecentIds
from batcher.webhooks.events import GenerationEvent
from batcher.webhooks.secret import WebhookSecret
from batcher.webhooks.signing import DEFAULT_TOLERANCE, Verifier
from batcher.webhooks.sink import Disposition, EventSink
from batcher.webhooks.stats import ReceiverStats

__all__ = ["DEFAULT_MAX_BODY", "Outcome", "WebhookReceiver"]

log = logging.getLogger(__name__)

#: Generation events are well under 2 KiB; this leaves room for long error details.
DEFAULT_MAX_BODY = 256 * 1024
#: Longest wait for the sink before answering 503.
DEFAULT_SINK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery ended: the HTTP status and what was done."""

    status: int
    disposition: Disposition | None = None
    reason: RefusalReason | None = None
    message: str = ""

    def body(self) -> dict[str, str]:
        """The JSON answer: ``{"disposition"}`` or ``{"error", "code"}``."""
        if self.disposition is not None:
            return {"disposition": self.disposition.value}
        code = self.reason.value if self.reason is not None else "unavailable"
        return {"error": self.message, "code": code}


class WebhookReceiver:
    """Receives signed generation events for one endpoint secret.

    ``sink`` takes the verified events (see :class:`EventSink`);
    ``tolerance`` is the timestamp window in seconds; ``max_body`` caps a
    delivery's size; ``wall`` is the unix-seconds clock (injected in tests);
    ``remember`` bounds how many message ids are kept for de-duplication;
    ``sink_timeout`` bounds the wait for the sink. Serve :meth:`app`, or call
    :meth:`receive` directly with a body and its headers.
    """

    def __init__(
        self,
        secret: WebhookSecret,
        sink: EventSink,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        max_body: int = DEFAULT_MAX_BODY,
        wall: Callable[[], float] = time.time,
        remember: int = 100_000,
        sink_timeout: float = DEFAULT_SINK_TIMEOUT,
    ) -> None:
        if max_body < 1:
            raise ValueError("max_body must be at least 1 byte")
        self._verifier = Verifier(secret, tolerance=tolerance, wall=wall)
        self._sink = sink
        self._recent = RecentIds(remember)
        self._in_flight: dict[str, asyncio.Event] = {}
        self.max_body = max_body
        self.sink_timeout = sink_timeout
        self.stats = ReceiverStats()

    def __repr__(self) -> str:
        return (f"WebhookReceiver(secret=***, tolerance={self._verifier.tolerance:g},"
                f" max_body={self.max_body}, received={self.stats.received})")

    def snapshot(self) -> dict[str, object]:
        """The counters as plain data (see :class:`ReceiverStats`)."""
        return self.stats.snapshot()

    # -- HTTP ----------------------------------------------------------------

    def app(self) -> web.Application:
        """An aiohttp application taking ``POST`` deliveries at any path."""
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp handler: method and size checks, then :meth:`receive`."""
        if request.method != "POST":
            return web.json_response(
                {"error": "Only POST deliveries are accepted.", "code": "methodNotAllowed"},
                status=405, headers={"Allow": "POST"})
        length = request.content_length
        if length is not None and length > self.max_body:
            outcome = self._too_large()
        else:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                outcome = self._too_large()
            else:
                outcome = await self.receive(body, request.headers)
        return web.json_response(outcome.body(), status=outcome.status)

    def _too_large(self) -> Outcome:
        self.stats.received += 1
        return self._refused(DeliveryRefused(
            RefusalReason.TOO_LARGE, f"the body is larger than {self.max_body} bytes"))

    # -- the pipeline ---------------------------------------------------------

    async def receive(self, body: bytes, headers: Mapping[str, str]) -> Outcome:
        """Handle one delivery: ``body`` exactly as received, and its headers."""
        self.stats.received += 1
        if len(body) > self.max_body:
            return self._refused(DeliveryRefused(
                RefusalReason.TOO_LARGE, f"the body is larger than {self.max_body} bytes"))
        try:
            delivery = self._verifier.verify(body, headers)
        except DeliveryRefused as refusal:
            return self._refused(refusal)
        message_id = delivery.message_id
        while True:
            if self._recent.seen(message_id, self._verifier.wall()):
                self.stats.count(Disposition.DUPLICATE)
                return Outcome(200, Disposition.DUPLICATE)
            pending = self._in_flight.get(message_id)
            if pending is None:
                break
            await pending.wait()
        try:
            event = GenerationEvent.from_json(body)
        except DeliveryRefused as refusal:
            return self._refused(refusal, message_id)
        done = self._in_flight[message_id] = asyncio.Event()
        try:
            disposition = await self._hand_over(event, message_id)
        finally:
            del self._in_flight[message_id]
            done.set()
        if disposition is None:
            self.stats.sink_errors += 1
            return Outcome(503, message="the event could not be recorded now; deliver it again")
        self._recent.remember(message_id, delivery.timestamp + self._verifier.tolerance,
                              self._verifier.wall())
        self.stats.count(disposition)
        log.debug("webhook %s accepted: %s", message_id, disposition.value,
                  extra=log_event(WEBHOOK_ACCEPTED, message_id=message_id,
                                  disposition=disposition.value,
                                  generation=event.generation_id,
                                  event_type=event.event_type.value))
        return Outcome(200, disposition)

    async def _hand_over(self, event: GenerationEvent, message_id: str) -> Disposition | None:
        try:
            async with asyncio.timeout(self.sink_timeout):
                return Disposition(await self._sink.accept(event, message_id))
        except Exception as exc:  # any sink failure: answer 503 so the event comes again
            error = (type(exc).__name__ if isinstance(exc, TimeoutError) else
                     f"{type(exc).__name__}: {exc}")
            log.warning("webhook %s could not be recorded (answered 503): %s", message_id,
                        error, extra=log_event(WEBHOOK_SINK_FAILED, message_id=message_id,
                                               generation=event.generation_id, error=error))
            return None

    def _refused(self, refusal: DeliveryRefused, message_id: str | None = None) -> Outcome:
        self.stats.refuse(refusal.reason)
        log.info("webhook %s refused: %s", message_id or "(no id)", refusal,
                 extra=log_event(WEBHOOK_REFUSED, reason=refusal.reason.value,
                                 detail=refusal.message, message_id=message_id))
        return Outcome(refusal.http_status, reason=refusal.reason, message=refusal.message)

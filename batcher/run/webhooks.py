"""Webhooks in a run: events from the ledger move rows; polls become a safety net.

The receiver (:mod:`batcher.webhooks`) records each verified event in the
ledger before it answers 2xx (:class:`LedgerSink`). This module reads the
ledger's events in order (:class:`EventFeed`), whether this run's own
receiver wrote them or ``batcher webhooks serve`` on another host did, and
moves each watched row exactly as a poll answer would: complete → download
(file rows) or complete, failed → failed with the API's error.

When a generation is polled with webhooks on (:class:`SafetyNet`, the
poller's :class:`~batcher.run.poll.PollPolicy`): only once no terminal event
came within a *patience* after it was accepted, so a lost delivery never
stalls a row, and a job whose events all arrive makes almost no polls. The
patience is learned from the times events took (1.5 × their 90th
percentile plus one ``--poll-interval``), at least twice ``--poll-interval``
and at most ``--webhook-poll-ceiling``; before five were seen it is four
``--poll-interval`` (at least 10 s). After a poll that finds the generation
unfinished the poller's usual back-off takes over.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from ..answers import GenerationStatus
from ..errors import LedgerError, TransitionConflict
from ..ledger.webhook_events import StoredEvent, WebhookLedger
from ..model import Stage
from ..ops.logs import WEBHOOK_APPLIED, WEBHOOK_APPLY_FAILED, WEBHOOK_COUNTS_FAILED, event
from ..webhooks.events import GenerationEvent, supersedes
from ..webhooks.sink import Disposition
from .context import RunContext
from .poll import Polling, PollItem

if TYPE_CHECKING:  # aiohttp.web: only a run that receives webhooks imports it
    from ..webhooks.receiver import WebhookReceiver

__all__ = ["EventFeed", "LedgerSink", "SafetyNet", "WebhookCounts"]

log = logging.getLogger(__name__)

# Seconds between reads of the ledger's events when nothing woke the feed
# (events another host's receiver recorded).
FEED_INTERVAL = 0.5
DEFAULT_CEILING = 120.0


class LedgerSink:
    """The receiver's sink in a run or ``webhooks serve``: the ledger, then a wake-up.

    ``recorded`` is called after each event the ledger kept as news, so the
    run's feed reads it at once rather than at its next interval.
    """

    def __init__(self, ledger: WebhookLedger, recorded: Callable[[], None] | None = None
                 ) -> None:
        self._ledger = ledger
        self.recorded = recorded

    async def accept(self, event: GenerationEvent, message_id: str) -> Disposition:
        """Record durably (the receiver answers 2xx only after this returns)."""
        disposition = await self._ledger.record_webhook_event(event, message_id)
        if disposition is Disposition.RECORDED and self.recorded is not None:
            self.recorded()
        return disposition


class SafetyNet:
    """When to poll with webhooks on: see the module. A :class:`PollPolicy`."""

    def __init__(self, poll_interval: float, ceiling: float = DEFAULT_CEILING, *,
                 quantile: float = 0.9, min_samples: int = 5) -> None:
        self.poll_interval = poll_interval
        self.ceiling = max(ceiling, 0.0)
        self.quantile = quantile
        self.min_samples = min_samples
        self._samples: deque[float] = deque(maxlen=256)
        #: generation id -> the item watched for it
        self.watched: dict[str, PollItem] = {}
        # Terminal events of generations not watched (yet): the event can
        # come before the create answer is written, or before a resumed row
        # is dispatched.
        self.early: dict[str, GenerationEvent] = {}
        self._ready: deque[tuple[PollItem, GenerationEvent]] = deque()
        self._wake: Callable[[], None] = lambda: None
        self._settle: Callable[[PollItem], None] = lambda _item: None

    def bind(self, wake: Callable[[], None], settle: Callable[[PollItem], None]) -> None:
        """Who to wake when an event is ready to apply, and how to stop an item's polls."""
        self._wake, self._settle = wake, settle

    def observe(self, seconds: float) -> None:
        """A generation's terminal event came ``seconds`` after it was accepted."""
        if seconds >= 0:
            self._samples.append(seconds)

    def patience(self) -> float:
        """Seconds after acceptance before a generation with no terminal event is polled."""
        if len(self._samples) < self.min_samples:
            wait = max(4 * self.poll_interval, 10.0)
        else:
            ordered = sorted(self._samples)
            learned = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
            wait = max(2 * self.poll_interval, 1.5 * learned + self.poll_interval)
        return min(wait, self.ceiling)

    # -- PollPolicy ------------------------------------------------------------

    def watch(self, item: PollItem, *, resumed: bool) -> float | None:
        """Register ``item``; a known terminal event settles it at once."""
        self.watched[item.generation_id] = item
        known = self.early.pop(item.generation_id, None)
        if known is not None:
            self._ready_to_apply(item, known)
        # A resumed row may have missed its events while nothing received them.
        return 0.0 if resumed else self.patience()

    def forget(self, item: PollItem) -> None:
        """A poll finished ``item``."""
        if self.watched.get(item.generation_id) is item:
            del self.watched[item.generation_id]

    # -- events ------------------------------------------------------------------

    def note(self, stored: StoredEvent) -> None:
        """An event read from the ledger: applied if terminal and watched, else kept."""
        if stored.disposition is not Disposition.RECORDED or not stored.event.terminal:
            return
        gen = stored.event.generation_id
        item = self.watched.get(gen)
        if item is None:
            if supersedes(stored.event, self.early.get(gen)):
                self.early[gen] = stored.event
            return
        self._ready_to_apply(item, stored.event)

    def _ready_to_apply(self, item: PollItem, ev: GenerationEvent) -> None:
        if item.settled:
            return
        del self.watched[item.generation_id]
        self._settle(item)
        self._ready.append((item, ev))
        self._wake()

    def take_ready(self) -> list[tuple[PollItem, GenerationEvent]]:
        """The items settled by events, to move on now."""
        ready = list(self._ready)
        self._ready.clear()
        return ready


class EventFeed:
    """Reads the ledger's events in order and moves watched rows (see the module)."""

    def __init__(self, ctx: RunContext, polling: Polling, net: SafetyNet, *,
                 interval: float = FEED_INTERVAL, batch: int = 1000) -> None:
        self.ctx = ctx
        self.polling = polling
        self.net = net
        self.interval = interval
        self.batch = batch
        self.cursor = 0
        self._wakeup = anyio.Event()
        self._closed = False
        net.bind(self.wake, polling.poller.settle)

    def wake(self) -> None:
        """Read the ledger now (an event was recorded, or one is ready to apply)."""
        self._wakeup.set()

    def close(self) -> None:
        """Stop after the current round."""
        self._closed = True
        self.wake()

    async def catch_up(self) -> None:
        """Read every event recorded so far (before resumed rows are dispatched)."""
        while await self._read() == self.batch:
            pass

    async def _read(self) -> int:
        found = await self.ctx.ledger.webhook_events_since(self.cursor, self.batch)
        for stored in found:
            self.cursor = max(self.cursor, stored.seq)
            self.net.note(stored)
        return len(found)

    async def run(self) -> None:
        """Until closed: read new events, apply what is ready, wait for a wake-up."""
        async with anyio.create_task_group() as tg:
            while not self._closed:
                self._wakeup = anyio.Event()
                try:
                    while await self._read() == self.batch:
                        pass
                except LedgerError as exc:  # infrastructure: the safety net polls meanwhile
                    log.warning("cannot read webhook events from the ledger: %s", exc,
                                extra=event(WEBHOOK_APPLY_FAILED, error=str(exc)))
                self._start_ready(tg)
                with anyio.move_on_after(self.interval):
                    await self._wakeup.wait()
            self._start_ready(tg)

    def _start_ready(self, tg: TaskGroup) -> None:
        for item, ev in self.net.take_ready():
            tg.start_soon(self._apply, item, ev)

    async def _apply(self, item: PollItem, ev: GenerationEvent) -> None:
        """Move the row as a poll answering ``ev``'s status would."""
        ctx = self.ctx
        if not item.resumed:
            self.net.observe(ctx.clock.now() - item.submitted_at)
        if item.polls == 0:
            ctx.stats.polls_saved += 1
        row = item.row
        status = GenerationStatus.of(ev.api_status)
        for _ in range(3):
            if row is None:
                return
            try:
                await self.polling.after_status(row, status, ev.api_status, error=ev.error,
                                                details=ev.error_details, poll=None)
            except TransitionConflict:
                # A poll (or another host) wrote the row meanwhile: look again.
                row = await ctx.ledger.get(item.row_id)
                if (row is None or row.stage is not Stage.SUBMITTED
                        or row.generation_id != item.generation_id):
                    return
                continue
            ctx.stats.events_applied += 1
            log.debug("row %s moved on by event %s", item.row_id, ev.event_type.value,
                      extra=event(WEBHOOK_APPLIED, row=item.row_id,
                                  generation=item.generation_id, status=ev.api_status))
            return


class WebhookCounts:
    """Adds a receiver's counters (and polls saved) to the ledger's, now and then.

    The ledger's counters are what ``batcher status`` shows; several
    receivers add to them. ``extra`` gives further counters to add (polls saved).
    """

    def __init__(self, ledger: WebhookLedger, receiver: WebhookReceiver,
                 extra: Callable[[], dict[str, int]] | None = None) -> None:
        self._ledger = ledger
        self._receiver = receiver
        self._extra = extra
        self._sent: dict[str, int] = {}

    def _totals(self) -> dict[str, int]:
        snap = self._receiver.snapshot()
        totals = {k: int(v) for k, v in snap.items() if isinstance(v, int)}
        refused = snap.get("refused", {})
        assert isinstance(refused, dict)
        totals.update({f"refused.{k}": int(v) for k, v in refused.items()})
        if self._extra is not None:
            totals.update(self._extra())
        return totals

    async def flush(self) -> None:
        """Add what changed since the last flush."""
        totals = self._totals()
        deltas = {k: v - self._sent.get(k, 0) for k, v in totals.items()}
        if any(deltas.values()):
            await self._ledger.add_webhook_counts(deltas)
            self._sent = totals

    async def run(self, every: float = 5.0,
                  sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        """Flush every ``every`` seconds until cancelled (flush once more at the end)."""
        try:
            while True:
                await sleep(every)
                try:
                    await self.flush()
                except LedgerError as exc:
                    log.warning("cannot add webhook counters to the ledger: %s", exc,
                                extra=event(WEBHOOK_COUNTS_FAILED, error=str(exc)))
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(LedgerError):
                    await self.flush()

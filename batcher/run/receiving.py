"""Starting webhooks for a run: the receiver on ``--webhook-listen``, and the simulator's sender.

:func:`receive_events` serves a :class:`~batcher.webhooks.WebhookReceiver`
whose sink is the ledger for as long as its block runs, and adds its
counters to the ledger's now and then (and once at the end).
:func:`simulated_events` makes an embedded simulator deliver its events to
that receiver, signed with the same secret (``run --simulate
--webhook-listen``: both ends wired, nothing to configure).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from ..ops.logs import WEBHOOK_LISTENING, event
from ..settings import Settings
from ..webhooks.receiver import WebhookReceiver
from ..webhooks.secret import DEFAULT_SECRET_ENV, WebhookSecret, load_secret
from ..webhooks.server import ListenAddress, parse_listen, serve_receiver
from .stats import RunStats
from .webhooks import LedgerSink, WebhookCounts

__all__ = ["Receiving", "receive_events", "simulated_events", "webhook_secret"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Receiving:
    """A receiver serving for a run: where, with what secret, into which sink."""

    receiver: WebhookReceiver
    sink: LedgerSink
    address: ListenAddress
    secret: WebhookSecret


def webhook_secret(settings: Settings, environ: Mapping[str, str] | None = None
                   ) -> WebhookSecret:
    """The endpoint's secret from the environment; a fresh one for a simulated run without."""
    env = os.environ if environ is None else environ
    name = settings.webhook_secret_env or DEFAULT_SECRET_ENV
    if settings.simulate and not env.get(name, "").strip():
        return WebhookSecret.generate()
    return load_secret(settings.webhook_secret_env, environ=env)


@asynccontextmanager
async def receive_events(settings: Settings, ledger: Any, stats: RunStats
                         ) -> AsyncIterator[Receiving]:
    """Serve the receiver on ``--webhook-listen`` while the block runs."""
    assert settings.webhook_listen is not None
    secret = webhook_secret(settings)
    listen = parse_listen(settings.webhook_listen)
    sink = LedgerSink(ledger)
    receiver = WebhookReceiver(secret, sink)
    stats.webhooks = receiver
    counts = WebhookCounts(ledger, receiver, lambda: {"pollsSaved": stats.polls_saved})
    async with serve_receiver(listen.host, listen.port, receiver) as address:
        log.info("receiving webhook events on %s", address,
                 extra=event(WEBHOOK_LISTENING, address=str(address)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(counts.run)
            try:
                yield Receiving(receiver, sink, address, secret)
            finally:
                tg.cancel_scope.cancel()


@asynccontextmanager
async def simulated_events(sim: Any, receiving: Receiving,
                           faults: Mapping[str, Any] | None = None, *, seed: int = 0
                           ) -> AsyncIterator[Any]:
    """Make the simulator ``sim`` (not yet served) deliver events to ``receiving``.

    ``faults`` is a ``[webhooks]`` table of ``--sim-config``
    (see :class:`~batcher.simulator.webhooks.WebhookFaults`).
    """
    from ..simulator.webhooks import WebhookFaults, WebhookSender, attach_webhooks

    knobs = WebhookFaults.from_mapping(faults or {})
    async with WebhookSender(faults=knobs, seed=seed, default_secret=receiving.secret) as sender:
        sender.configure(receiving.address.url)
        attach_webhooks(sim, sender)
        yield sender

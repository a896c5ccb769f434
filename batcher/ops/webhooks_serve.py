"""``batcher webhooks serve``: the webhook receiver alone, writing into a ledger.

Several hosts running ``batcher run`` on one PostgreSQL ledger can share one
public endpoint: a proxy sends the API's deliveries to one ``webhooks
serve`` (or several, behind it), which records each event in the ledger
before it answers 2xx; every run reads the ledger's events and moves the
rows it holds. The first line printed is ``receiving webhook events on
http://HOST:PORT/`` (flushed), so a supervisor can read the bound port.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import anyio

from ..ledger import open_ledger
from ..model import RunInfo
from ..ops.logs import WEBHOOK_LISTENING, event
from ..run.webhooks import LedgerSink, WebhookCounts
from ..webhooks.receiver import WebhookReceiver
from ..webhooks.secret import load_secret
from ..webhooks.server import parse_listen, serve_receiver

__all__ = ["serve_main"]

log = logging.getLogger(__name__)


async def serve_main(ledger_url: str, listen: str, secret_env: str | None,
                     *, counts_every: float = 5.0) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status (0 after a signal)."""
    secret = load_secret(secret_env)
    address = parse_listen(listen, option="--listen")
    ledger: Any = open_ledger(ledger_url)
    await ledger.open(RunInfo.start(" ".join(sys.argv[1:])), lock=True)
    exit_code = 0
    try:
        receiver = WebhookReceiver(secret, LedgerSink(ledger))
        counts = WebhookCounts(ledger, receiver)
        async with serve_receiver(address.host, address.port, receiver) as bound:
            print(f"receiving webhook events on {bound.url}", flush=True)
            log.info("receiving webhook events on %s into %s", bound, ledger.description,
                     extra=event(WEBHOOK_LISTENING, address=str(bound)))
            async with anyio.create_task_group() as tg:
                tg.start_soon(counts.run, counts_every)
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                tg.cancel_scope.cancel()
        snap = receiver.snapshot()
        print(f"received {snap['received']} deliveries: {snap['recorded']} recorded, "
              f"{snap['duplicates']} duplicates, {snap['stale']} stale, "
              f"{snap['unknown']} unknown, {receiver.stats.refused_total} refused", flush=True)
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close(exit_code)
    return exit_code

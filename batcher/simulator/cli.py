"""``batcher simulate``: serve the simulator until SIGINT/SIGTERM.

Settings are layered: defaults, then ``--config FILE`` (JSON or TOML), then
the flags. ``--api`` picks the API generation served (current by default).
The first line of stdout is the base URL, flushed, so a parent process can
read it and start talking.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from batcher.errors import ConfigError
from batcher.simulator.catalog import API_GENERATIONS, MODEL_ENDPOINTS, ApiGeneration
from batcher.simulator.config import (
    DEFAULT_API_KEY,
    SimConfig,
    load_config_file,
    parse_range,
    parse_size,
)

if TYPE_CHECKING:
    from batcher.simulator.app import Simulator

__all__ = ["add_arguments", "build_config", "main"]


def _range(text: str) -> tuple[float, float]:
    try:
        return parse_range("range", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size("size", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# flag dest -> SimConfig field, for the knobs that map one to one
_KNOBS = (
    "api", "latency", "error_rate", "lost_rate", "html_rate", "truncated_rate", "rate_limit",
    "duration", "failure_rate", "price_per_second", "flat_price", "upload_ttl",
    "download_ttl", "seed", "auto_create_projects", "part_size", "max_upload_bytes",
    "upload_session_ttl", "edge_part_size", "part_error_rate", "part_lost_rate", "part_latency",
)


_WEBHOOK_FAULTS = {
    "drop": "share of events never delivered [0]",
    "duplicate": "share of events delivered twice (same message id) [0]",
    "delay": "share of events delivered up to --webhook-delay-max late [0]",
    "reorder": "share of events held back until the generation's next event went out [0]",
    "forged": "share of events followed by a third party's forgery claiming the opposite "
              "ending [0]",
    "tampered": "share of events preceded by a copy with a genuine signature and an "
                "altered body [0]",
    "replay": "share of deliveries sent again byte for byte shortly after [0]",
    "stale": "share of events also sent signed with a timestamp 10 minutes old [0]",
}


def webhook_faults(args: argparse.Namespace, file_table: dict[str, Any] | None) -> Any:
    """The sender's faults: the config file's [webhooks] table, then the flags."""
    from batcher.simulator.webhooks import WebhookFaults

    faults = WebhookFaults.from_mapping(file_table or {})
    flags = {name: getattr(args, f"webhook_{name}", None)
             for name in (*_WEBHOOK_FAULTS, "delay_max")}
    return faults.patched({k: v for k, v in flags.items() if v is not None})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``batcher simulate``'s options to ``parser``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    add("--port", type=int, default=8765, help="port to listen on; 0 picks a free one [8765]")
    add("--api-key", dest="api_keys", action="append", metavar="KEY",
        help=f"accept KEY (active, read+write); repeatable [{DEFAULT_API_KEY}]")
    add("--config", metavar="FILE", help="JSON or TOML file of settings (flags override it)")
    add("--api", choices=API_GENERATIONS,
        help="API generation to serve: current (diffio-4.6 models, uploads in parts, 410 for "
             "retired models) or seed (diffio-3.5/2.0 models, one signed PUT) [current]")
    g = parser.add_argument_group("faults and behaviour (each overrides --config)")
    g.add_argument("--latency", type=_range, metavar="MIN,MAX",
                   help="extra seconds before every API answer [0]")
    g.add_argument("--error-rate", type=_share, metavar="P",
                   help="share of API requests answered 500 before any work [0]")
    g.add_argument("--lost-rate", type=_share, metavar="P",
                   help="share of generation requests created and charged, then the "
                        "connection is cut without an answer [0]")
    g.add_argument("--html-rate", type=_share, metavar="P",
                   help="share of API requests answered by an HTML 502 page [0]")
    g.add_argument("--truncated-rate", type=_share, metavar="P",
                   help="share of 200 answers whose JSON is cut short (work done) [0]")
    g.add_argument("--rate-limit", type=_positive, metavar="R",
                   help="most requests per key in any 1 s window; above: 429 + Retry-After "
                        "[no limit]")
    g.add_argument("--duration", type=_range, metavar="MIN,MAX",
                   help="seconds a generation takes to finish [1,3]")
    g.add_argument("--failure-rate", type=_share, metavar="P",
                   help="share of generations that end failed [0]")
    g.add_argument("--spend-limit", type=_positive, metavar="USD",
                   help="spend limit of every key; above: 402 spendLimitExceeded [none]")
    g.add_argument("--price-per-second", type=_positive, metavar="USD",
                   help="price per second of WAV audio, 60 s minimum [0.001]")
    g.add_argument("--flat-price", type=_positive, metavar="USD",
                   help="price of a generation whose project holds no readable WAV [0.06]")
    g.add_argument("--upload-ttl", type=_positive, metavar="S",
                   help="lifetime of the seed's signed upload URLs [3600]")
    g.add_argument("--download-ttl", type=_positive, metavar="S",
                   help="lifetime of signed download URLs [7200 seed, 21600 current]")
    g.add_argument("--seed", type=int, help="seed of the random source [0]")
    g.add_argument("--auto-create-projects", action="store_true", default=None,
                   help="create unknown apiProjectIds on generation requests")
    u = parser.add_argument_group(
        "upload host (current API; BYTES take K, M, G suffixes; each overrides --config)")
    u.add_argument("--part-size", type=_size, metavar="BYTES",
                   help="partSizeBytes of the upload sessions create_project hands out [32M]")
    u.add_argument("--edge-part-size", type=_size, metavar="BYTES",
                   help="partSizeBytes in the upload host's start answer, overriding the "
                        "session's [the session's]")
    u.add_argument("--max-upload-bytes", type=_size, metavar="BYTES",
                   help="maxBytes of an upload; larger files and parts past it are "
                        "refused [2G]")
    u.add_argument("--upload-session-ttl", type=_positive, metavar="S",
                   help="lifetime of an upload session; changing it live also moves the "
                        "expiry of sessions already handed out [3600]")
    u.add_argument("--part-error-rate", type=_share, metavar="P",
                   help="share of part PUTs answered 500 before the part is stored [0]")
    u.add_argument("--part-lost-rate", type=_share, metavar="P",
                   help="share of part PUTs stored, then the connection is cut without "
                        "an answer [0]")
    u.add_argument("--part-latency", type=_range, metavar="MIN,MAX",
                   help="extra seconds before every part PUT is answered [0]")
    w = parser.add_argument_group(
        "webhooks (signed generation events; a [webhooks] table of --config sets the faults)")
    w.add_argument("--webhook-url", metavar="URL",
                   help="deliver every key's generation events to URL "
                        "[none; POST /v1/webhooks/configure adds endpoints]")
    w.add_argument("--webhook-secret-env", metavar="NAME", default=None,
                   help="environment variable holding the signing secret (whsec_...) "
                        "[BATCHER_WEBHOOK_SECRET; a fresh secret when unset]")
    w.add_argument("--admin-key", dest="admin_keys", action="append", metavar="KEY",
                   help="a key allowed to call /v1/webhooks/configure and send_test_event "
                        "(admin, webhooks:write); repeatable [none]")
    for fault, meaning in _WEBHOOK_FAULTS.items():
        w.add_argument(f"--webhook-{fault}", dest=f"webhook_{fault}", type=_share,
                       metavar="P", help=meaning)
    w.add_argument("--webhook-delay-max", dest="webhook_delay_max", type=_positive,
                   metavar="S", help="longest extra wait of a delayed or duplicated event [1]")


def build_config(args: argparse.Namespace) -> SimConfig:
    """The config from defaults, ``--config`` and the flags (ConfigError if bad)."""
    data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    data = {k: v for k, v in data.items() if k.strip().lower() != "webhooks"}
    config = SimConfig.from_mapping(data)
    changes: dict[str, Any] = {
        name: getattr(args, name) for name in _KNOBS if getattr(args, name, None) is not None
    }
    keys = getattr(args, "api_keys", None)
    if keys:
        # Named keys replace the demo key, but join the keys of a config file.
        file_keys = any(k.replace("-", "_").lower() == "api_keys" for k in data)
        config = dataclasses.replace(config, api_keys=config.api_keys if file_keys else {})
        changes["api_keys"] = {k: {} for k in keys}
    config = config.patched(changes)
    limit = getattr(args, "spend_limit", None)
    if limit is not None:
        config = config.patched(
            {"api_keys": {k: {"spend_limit_usd": limit} for k in config.api_keys}}
        )
    if not config.api_keys:
        raise ConfigError("the simulator needs at least one API key")
    return config


def _served(api: ApiGeneration, origin: str) -> str:
    models = ", ".join(sorted(set(MODEL_ENDPOINTS[api].values())))
    from batcher.simulator.edge import EDGE_PREFIX

    line = f"API: {api} (models {models})"
    if api == "current":
        line += f"; upload host {origin}{EDGE_PREFIX}"
    return line


@asynccontextmanager
async def _with_webhooks(sim: Simulator, args: argparse.Namespace) -> AsyncIterator[None]:
    """Attach a webhook sender when --webhook-url, --admin-key or a fault asks for one."""
    table = None
    if getattr(args, "config", None):
        data = load_config_file(args.config)
        table = next((v for k, v in data.items() if k.strip().lower() == "webhooks"), None)
    url = getattr(args, "webhook_url", None)
    admins = getattr(args, "admin_keys", None) or []
    if url is None and not admins and table is None:
        yield
        return
    from batcher.simulator.webhooks import WEBHOOKS_WRITE, WebhookSender, attach_webhooks
    from batcher.webhooks.secret import DEFAULT_SECRET_ENV, WebhookSecret, load_secret

    env_name = getattr(args, "webhook_secret_env", None)
    if env_name is None and not os.environ.get(DEFAULT_SECRET_ENV, "").strip():
        secret = WebhookSecret.generate()
    else:
        secret = load_secret(env_name)
    faults = webhook_faults(args, table)
    async with WebhookSender(faults=faults, seed=sim.config.seed,
                             default_secret=secret) as sender:
        if url is not None:
            sender.configure(url)
        attach_webhooks(sim, sender, {key: {WEBHOOKS_WRITE} for key in admins})
        yield


async def _serve(config: SimConfig, host: str, port: int,
                 args: argparse.Namespace | None = None) -> None:
    # The server (aiohttp.web) and asyncio only now: every `batcher` command
    # builds this parser, and `batcher --version` must not pay for them.
    import asyncio

    from batcher.simulator.app import Simulator
    from batcher.simulator.server import run_simulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    sim = Simulator(config)
    try:
        async with _with_webhooks(sim, args or argparse.Namespace()), \
                run_simulator(sim, host, port):
            print(f"Diffio simulator listening on {sim.base_url}", flush=True)
            origin = (sim.base_url or "").removesuffix("/v1")
            print(_served(config.api, origin), flush=True)
            print(f"stats: GET {origin}/_sim/stats; knobs: POST {origin}/_sim/config", flush=True)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(args: argparse.Namespace) -> int:
    """Run ``batcher simulate``; returns the exit status (0 after a signal, 2 on bad settings)."""
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"batcher simulate: {exc}", file=sys.stderr)
        return 2
    try:
        webhook_faults(args, None)
    except ConfigError as exc:
        print(f"batcher simulate: {exc}", file=sys.stderr)
        return 2
    try:
        import asyncio

        asyncio.run(_serve(config, args.host, args.port, args))
    except ConfigError as exc:  # the webhook secret
        print(f"batcher simulate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"batcher simulate: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 2
    return 0

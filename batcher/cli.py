"""The ``batcher`` command line: a thin edge over the library.

Library errors become one clear line here (exit 2, 3 or 4, as documented for
``batcher run``); signal handling lives here and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from . import __version__
from .errors import (
    BatcherError,
    ConfigError,
    LedgerError,
    LedgerLocked,
    ManifestError,
    exit_code_for,
    find_error,
)
from .settings import OPTION_SPECS, Settings, resolve

if TYPE_CHECKING:
    from .run.stats import RunStats

__all__ = ["build_parser", "main"]

log = logging.getLogger("batcher")

# status and export whose reader closed the pipe: 128 + SIGPIPE, as a shell
# reports a tool that SIGPIPE ended.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path,
                   help="manifest (.csv, .jsonl, .ndjson) or job file (.toml)")
    for spec in OPTION_SPECS:
        if spec.name == "manifest":
            continue
        metavar = {"ledger": "PATH_OR_URL", "model": "KEY", "rate": "R",
                   "concurrency": "N", "poll_interval": "S", "out": "DIR",
                   "key_namespace": "NS", "api_base": "URL", "price_per_minute": "USD",
                   "max_spend": "USD", "report": "FILE", "metrics": "FILE",
                   "max_bandwidth": "RATE", "outage_patience": "DURATION",
                   "webhook_listen": "HOST:PORT",
                   "webhook_secret_env": "NAME", "webhook_poll_ceiling": "S",
                   "webhook_events": "ledger"}.get(
                       spec.name, spec.name.upper())
        default = "" if spec.default in (None, "") else f" [default: {spec.default}]"
        p.add_argument(spec.flag, dest=spec.name, metavar=metavar, default=None,
                       help=f"{spec.help}{default} (env {spec.env})")
    p.add_argument("--retry-failed", action="store_true",
                   help="also retry rows the ledger holds as failed")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the manifest and print the plan; no API request")
    p.add_argument("--simulate", action="store_true",
                   help="run against the embedded Diffio simulator (no key, no cost)")
    p.add_argument("--sim-config", type=Path, default=None,
                   help="with --simulate: simulator knobs from a JSON or TOML file")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")


def _add_ledger_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE|LEDGER",
                   help="what run takes (manifest or job file), whose ledger is found as run "
                   "finds it; or a SQLite ledger path or postgresql:// URL")
    p.add_argument("--ledger", metavar="PATH_OR_URL", default=None,
                   help="with a manifest or job file: its ledger, as for run "
                   "(env BATCHER_LEDGER)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="batcher",
        description="Run bulk jobs against the Diffio audio-restoration API: resumable, "
        "rate-limited, never paying twice. The API key comes from DIFFIO_API_KEY; the "
        "base URL from --api-base or DIFFIO_API_BASE_URL.",
    )
    parser.add_argument("--version", action="version", version=f"batcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a job",
                         description="Run or resume a job. Re-running the same command after "
                         "any interruption resumes it; no logical request is charged twice.")
    _add_run_options(run)
    _add_common(run)
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="counts by status and the most common errors",
                            description="Counts by status, the most common errors and the "
                            "last run, read from the ledger (also while a run writes it).")
    _add_ledger_source(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_common(status)
    status.set_defaults(func=_cmd_status)

    export = sub.add_parser("export", help="one record per manifest row, JSONL or CSV",
                            description="One record per manifest row, read from the ledger "
                            "(also while a run writes it). CSV cells that a spreadsheet would "
                            "read as a formula start with an added '.")
    _add_ledger_source(export)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("-o", "--output", type=Path, default=None, help="file [stdout]")
    export.add_argument("--all", action="store_true",
                        help="include rows no longer in the manifest (retired)")
    _add_common(export)
    export.set_defaults(func=_cmd_export)

    webhooks = sub.add_parser("webhooks", help="the webhook receiver on its own")
    hooks = webhooks.add_subparsers(dest="webhooks_command", required=True)
    serve = hooks.add_parser(
        "serve", help="receive the API's signed events into a ledger until stopped",
        description="Receive the API's signed generation events and record them in the "
        "ledger, for the runs on that ledger (several hosts behind one endpoint share a "
        "PostgreSQL ledger). The secret comes from the environment, never a flag.")
    serve.add_argument("--ledger", required=True, metavar="PATH_OR_URL",
                       help="the job's ledger: postgresql://… (shared), or a SQLite file no "
                       "run holds")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT",
                       help="where to receive deliveries; a bare PORT binds 127.0.0.1")
    serve.add_argument("--webhook-secret-env", metavar="NAME", default=None,
                       help="environment variable holding the signing secret (whsec_...) "
                       "[BATCHER_WEBHOOK_SECRET]")
    _add_common(serve)
    serve.set_defaults(func=_cmd_webhooks_serve)

    from .simulator.cli import add_arguments as add_sim_arguments

    simulate = sub.add_parser("simulate", help="serve the embedded Diffio API simulator")
    add_sim_arguments(simulate)
    simulate.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``batcher`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        code = 130
    return code


def _configure_logging(args: argparse.Namespace, secret: str = "") -> None:
    from .ops.logs import configure

    level = logging.WARNING
    if getattr(args, "quiet", False):
        level = logging.ERROR
    elif getattr(args, "verbose", 0) >= 2:
        level = logging.DEBUG
    elif getattr(args, "verbose", 0) == 1:
        level = logging.INFO
    configure(level=level, json=getattr(args, "log_json", False), secret=secret)


def _error(message: str) -> None:
    print(f"batcher: error: {message}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    flags: dict[str, Any] = {spec.name: getattr(args, spec.name, None) for spec in OPTION_SPECS
                             if spec.name != "manifest"}
    try:
        settings = resolve(source=args.source, flags=flags, retry_failed=args.retry_failed,
                           dry_run=args.dry_run, simulate=args.simulate)
    except ConfigError as exc:
        _configure_logging(args)
        _error(str(exc))
        return 2
    _configure_logging(args, settings.api_key)
    from .manifest import open_manifest

    try:
        open_manifest(settings.manifest).close()
    except ManifestError as exc:
        _error(str(exc))
        return 2
    sim_config = None
    if args.sim_config is not None:
        from .simulator.config import load_config_file

        try:
            sim_config = load_config_file(args.sim_config)
        except (OSError, ValueError) as exc:
            _error(f"--sim-config {args.sim_config}: {exc}")
            return 2
    from .run.stats import RunStats

    stats = RunStats()
    try:
        progress = "off" if args.quiet else "json" if args.log_json else "auto"
        result: int = anyio.run(_run_with_signals, settings, sim_config, progress, stats,
                                backend="asyncio")
    except Exception as exc:
        found = find_error(exc)
        sent = stats.total_requests > 0
        if found is None:
            if args.verbose >= 2:
                raise
            # A bug, not the user's doing; the ledger holds every step taken.
            _error(f"unexpected {type(exc).__name__}: {exc} (a bug in batcher; the ledger "
                   "is consistent: run the same command again; -vv shows the traceback)")
            return 3 if sent else 2
        return _exit_for(found, sent=sent)
    return result


def _exit_for(found: BatcherError, *, sent: bool) -> int:
    """Print the one line an error ends the run with; return its exit code.

    Exit 2 says nothing was sent: once requests went out, a ledger failure
    is a resumable halt (3) like any infrastructure outage.
    """
    code = exit_code_for(found, sent=sent)
    if isinstance(found, LedgerLocked):
        _error(f"{found}; nothing was sent")
    elif code == 3 and "run the same command again" not in str(found):
        _error(f"{found}; rows keep their stages: run the same command again to finish")
    else:
        _error(str(found))
    return code


async def _run_with_signals(settings: Settings, sim_config: Any, progress: str,
                            stats: RunStats) -> int:
    from .api import run_job
    from .ops.report import print_summary

    interrupted: list[int] = []

    async def watch(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                interrupted.append(signum)
                print("batcher: interrupted; saving state…", file=sys.stderr, flush=True)
                scope.cancel()
                return

    result = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        result = await run_job(settings, sim_config=sim_config, progress=progress, stats=stats)
        tg.cancel_scope.cancel()
    if result is None:
        return 130
    if not settings.dry_run:
        print_summary(result, settings, stream=sys.stdout)
    return 130 if interrupted else result.exit_code


def _ledger_of(args: argparse.Namespace) -> tuple[str, str] | None:
    """``(ledger to read, its name)`` for status and export; None (said why) when
    there is none.

    A manifest or job file not run yet has no ledger: it reads as an empty one
    (a note on stderr), not as an error. A ledger path that does not exist is
    one.
    """
    from .settings import ledger_for

    try:
        url = ledger_for(str(args.source), ledger=args.ledger)
    except ConfigError as exc:
        _error(str(exc))
        return None
    if "://" in url or Path(url).exists():
        return url, url
    if url == str(args.source):
        _error(f"no ledger at {url}")
        return None
    print(f"batcher: no ledger yet at {url}: nothing has run for {args.source}",
          file=sys.stderr)
    return ":memory:", url


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``| head``): end quietly, as Unix tools do.

    Later writes (the interpreter's final flush) go to /dev/null instead of
    raising again; the exit status is the shell's for a death by SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _cmd_status(args: argparse.Namespace) -> int:
    from .ops.status import status_main

    return _read_ledger(args, lambda url, label: status_main(url, args.json, label=label))


def _cmd_export(args: argparse.Namespace) -> int:
    from .ops.export import export_main

    return _read_ledger(
        args, lambda url, _label: export_main(url, args.format, args.output, args.all))


def _read_ledger(args: argparse.Namespace,
                 command: Callable[[str, str], Awaitable[int]]) -> int:
    """Run ``status`` or ``export`` on the ledger that ``args`` name (or find)."""
    _configure_logging(args)
    found = _ledger_of(args)
    if found is None:
        return 2
    url, label = found
    try:
        result: int = anyio.run(command, url, label, backend="asyncio")
    except (LedgerError, ConfigError) as exc:
        _error(str(exc))
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    return result


def _cmd_webhooks_serve(args: argparse.Namespace) -> int:
    _configure_logging(args)
    from .ops.webhooks_serve import serve_main

    try:
        result: int = anyio.run(serve_main, args.ledger, args.listen, args.webhook_secret_env,
                                backend="asyncio")
    except Exception as exc:
        found = find_error(exc)
        if found is None:
            raise
        _error(str(found))
        return 4 if isinstance(found, LedgerLocked) else 2
    return result


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator.cli import main as sim_main

    return sim_main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

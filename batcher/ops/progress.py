"""Progress while a run goes: a live bar on a terminal, plain lines off it.

Cron and systemd capture stderr; a live bar there would be noise, so off a
terminal a plain line is printed every ``every`` seconds instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import anyio
import orjson

from ..bandwidth import format_rate
from ..run.stats import RunStats
from .logs import RUN_PROGRESS

__all__ = ["ProgressReporter", "format_bytes", "format_duration", "progress_json",
           "progress_line"]


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``12s``: a duration for people."""
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def _eta(seconds: float | None) -> str:
    return "?" if seconds is None else format_duration(seconds)


def format_bytes(n: float) -> str:
    """``1.5 GiB``: a byte count for people."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _extras(stats: RunStats, bandwidth: float | None) -> list[str]:
    """What today's API and a bandwidth cap add: the API's queue, the upload time left."""
    parts = []
    if stats.queue:
        parts.append(f"{len(stats.queue)} queued at the API (next at position "
                     f"{min(stats.queue.values())})")
    left = stats.upload_seconds_left(bandwidth)
    if left is not None and bandwidth is not None:
        parts.append(f"uploads {format_bytes(stats.upload_bytes - stats.uploaded_bytes)} left "
                     f"(~{_eta(left)} at {format_rate(bandwidth)})")
    if stats.webhooks is not None:
        hooks = stats.webhooks.stats
        parts.append(f"events {hooks.received} received ({hooks.refused_total} refused), "
                     f"{stats.polls_saved} polls saved")
    return parts


def progress_line(stats: RunStats, bandwidth: float | None = None) -> str:
    """One line: done / failed / in flight, request rate, 429s, ETA; the API's
    queue and, under ``--max-bandwidth`` (``bandwidth`` bytes/s), the upload time left."""
    todo = stats.rows_total - stats.rows_skipped - stats.rows_invalid
    return (
        f"progress: {stats.done}/{todo} done, {stats.failed} failed, "
        f"{max(stats.in_flight, 0)} in flight, {stats.request_rate():.1f} req/s, "
        f"{stats.rate_limited} 429s, ETA {_eta(stats.eta())}"
        + "".join(f", {part}" for part in _extras(stats, bandwidth))
    )


def progress_json(stats: RunStats, bandwidth: float | None = None) -> str:
    """The progress line as one JSON object, shaped as --log-json's records are."""
    todo = stats.rows_total - stats.rows_skipped - stats.rows_invalid
    eta = stats.eta()
    upload_eta = stats.upload_seconds_left(bandwidth)
    return orjson.dumps({
        "ts": round(time.time(), 3), "level": "info", "logger": __name__,
        "event": RUN_PROGRESS, "message": progress_line(stats, bandwidth),
        "done": stats.done, "todo": todo, "failed": stats.failed,
        "inFlight": max(stats.in_flight, 0), "requestsPerSecond": round(stats.request_rate(), 2),
        "rateLimited": stats.rate_limited, "etaSeconds": None if eta is None else round(eta, 1),
        "queued": len(stats.queue),
        "queueFront": min(stats.queue.values()) if stats.queue else None,
        "uploadBytesLeft": max(stats.upload_bytes - stats.uploaded_bytes, 0),
        "uploadSecondsLeft": None if upload_eta is None else round(upload_eta, 1),
        **({"webhooks": stats.webhook_snapshot()} if stats.webhooks is not None else {}),
    }).decode()


class ProgressReporter:
    """Shows progress until stopped; chooses bar or lines by the stream."""

    def __init__(self, stats: RunStats, *, every: float = 10.0,
                 stream: TextIO | None = None, json: bool = False,
                 bandwidth: float | None = None) -> None:
        self.stats = stats
        self.bandwidth = bandwidth
        self.every = max(every, 0.2)
        self.stream = stream or sys.stderr
        self._json = json
        self._live = self.stream.isatty() and not json
        self._progress: object | None = None

    async def run(self) -> None:
        """Report until cancelled."""
        if self._live:
            await self._run_bar()
        else:
            while True:
                await anyio.sleep(self.every)
                line = (progress_json(self.stats, self.bandwidth) if self._json
                        else progress_line(self.stats, self.bandwidth))
                print(line, file=self.stream, flush=True)

    async def _run_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]batcher"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=True,
            # Redrawn by this loop only when something changed (or once a
            # second, for the time left): rich's own refresh thread would
            # redraw ten times a second while the run only waits.
            auto_refresh=False,
        )
        self._progress = progress
        task = progress.add_task("run", total=None, detail="")
        shown: tuple[object, ...] = ()
        drawn = 0.0
        with progress:
            while True:
                s = self.stats
                todo = max(s.rows_total - s.rows_skipped - s.rows_invalid, 0)
                detail = (f"failed {s.failed} · in flight {max(s.in_flight, 0)} · "
                          f"{s.request_rate():.1f} req/s · 429s {s.rate_limited}"
                          + "".join(f" · {part}" for part in _extras(s, self.bandwidth)))
                now = time.monotonic()
                state = (todo, s.done + s.failed, detail)
                if state != shown or now - drawn >= 1.0:
                    progress.update(task, total=todo or None, completed=s.done + s.failed,
                                    detail=detail)
                    progress.refresh()
                    shown, drawn = state, now
                await anyio.sleep(0.25)

    def stop(self) -> None:
        """Nothing to flush for lines; the bar is transient and goes with its task."""

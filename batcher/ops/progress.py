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

from ..run.stats import RunStats
from .logs import RUN_PROGRESS

__all__ = ["ProgressReporter", "progress_json", "progress_line"]


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(stats: RunStats) -> str:
    """One line: done / failed / in flight, request rate, 429s, ETA."""
    todo = stats.rows_total - stats.rows_skipped - stats.rows_invalid
    return (
        f"progress: {stats.done}/{todo} done, {stats.failed} failed, "
        f"{max(stats.in_flight, 0)} in flight, {stats.request_rate():.1f} req/s, "
        f"{stats.rate_limited} 429s, ETA {_eta(stats.eta())}"
    )


def progress_json(stats: RunStats) -> str:
    """The progress line as one JSON object, shaped as --log-json's records are."""
    todo = stats.rows_total - stats.rows_skipped - stats.rows_invalid
    eta = stats.eta()
    return orjson.dumps({
        "ts": round(time.time(), 3), "level": "info", "logger": __name__,
        "event": RUN_PROGRESS, "message": progress_line(stats),
        "done": stats.done, "todo": todo, "failed": stats.failed,
        "inFlight": max(stats.in_flight, 0), "requestsPerSecond": round(stats.request_rate(), 2),
        "rateLimited": stats.rate_limited, "etaSeconds": None if eta is None else round(eta, 1),
    }).decode()


class ProgressReporter:
    """Shows progress until stopped; chooses bar or lines by the stream."""

    def __init__(self, stats: RunStats, *, every: float = 10.0,
                 stream: TextIO | None = None, json: bool = False) -> None:
        self.stats = stats
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
                line = progress_json(self.stats) if self._json else progress_line(self.stats)
                print(line, file=self.stream, flush=True)

    async def _run_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]batcher"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=True,
        )
        self._progress = progress
        task = progress.add_task("run", total=None, detail="")
        with progress:
            while True:
                s = self.stats
                todo = max(s.rows_total - s.rows_skipped - s.rows_invalid, 0)
                progress.update(
                    task, total=todo or None, completed=s.done + s.failed,
                    detail=(f"failed {s.failed} · in flight {max(s.in_flight, 0)} · "
                            f"{s.request_rate():.1f} req/s · 429s {s.rate_limited}"),
                )
                await anyio.sleep(0.25)

    def stop(self) -> None:
        """Nothing to flush for lines; the bar is transient and goes with its task."""

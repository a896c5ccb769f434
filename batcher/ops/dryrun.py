"""``--dry-run``: what a run would do and cost, without one API request.

Nothing is written to the ledger: rows are compared with it read-only.
Audio minutes come from file headers (mutagen); rows whose duration cannot be
read (apiProjectId rows, unknown formats) are shown as unknown and estimated
at the per-generation 60 s minimum (low), the mean of the known (expected) and
the longest known (high).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio

from ..answers import GenerationStatus
from ..bandwidth import format_rate
from ..intake import Intake, intake_batches
from ..ledger.base import Ledger
from ..model import Kind, Stage
from ..models import SUPPORTED_MODELS, is_retired
from ..run import RunResult
from ..run.stats import RunStats
from ..run.upload import DOCUMENTED_UPLOAD_LIMIT
from ..settings import Settings
from ..spend import MIN_BILLED_SECONDS, audio_seconds
from .progress import format_bytes, format_duration

__all__ = ["Plan", "make_plan", "print_plan"]


@dataclass(slots=True)
class Plan:
    """The counts and the estimate of a dry run."""

    total: int = 0
    new: int = 0
    complete: int = 0
    failed: int = 0
    in_flight: int = 0
    invalid: int = 0
    known_seconds: list[float] = field(default_factory=list)
    unknown: int = 0
    # Bytes of the files still to upload.
    upload_bytes: int = 0
    # Rows by model, for models today's API has retired.
    retired: Counter[str] = field(default_factory=Counter)
    # (line, path, size) of files over the documented upload limit.
    oversized: list[tuple[int, str, int]] = field(default_factory=list)

    def minutes(self) -> float:
        return sum(self.known_seconds) / 60.0

    def estimate(self, price_per_minute: float) -> tuple[float, float, float]:
        """(low, expected, high) USD for the new rows, 60 s minimum each."""
        billed = [max(MIN_BILLED_SECONDS, s) for s in self.known_seconds]
        known = sum(billed)
        mean = known / len(billed) if billed else MIN_BILLED_SECONDS
        longest = max(billed) if billed else MIN_BILLED_SECONDS
        per_second = price_per_minute / 60.0
        low = (known + self.unknown * MIN_BILLED_SECONDS) * per_second
        expected = (known + self.unknown * mean) * per_second
        high = (known + self.unknown * longest) * per_second
        return low, expected, high


async def make_plan(settings: Settings, ledger: Ledger, stats: RunStats,
                    stream: TextIO | None = None) -> RunResult:
    """Compare the manifest with the ledger and print the plan table."""
    stream = stream or sys.stdout
    plan = Plan()
    async for batch in intake_batches(Intake.of(settings)):
        for new in batch:
            plan.total += 1
            if new.error is not None:
                plan.invalid += 1
                continue
            if is_retired(new.model_key):
                plan.retired[new.model_key] += 1
            size = new.source_size or 0
            if new.kind is Kind.FILE and size > DOCUMENTED_UPLOAD_LIMIT:
                plan.oversized.append((new.line, new.source_path or "", size))
            row = await ledger.get(new.row_id)
            stage = row.stage if row is not None else Stage.PENDING
            changed = row is not None and new.kind is Kind.FILE and \
                row.source_sha256 != new.source_sha256
            # Rows not yet posted (a halted run leaves them pending, or with a
            # project and an upload) will be posted: new, priced by their audio.
            unposted = stage in (Stage.PENDING, Stage.PROJECT_CREATED, Stage.UPLOADED)
            # --retry-failed posts a generation the API ended as failed again,
            # under a new key: a new charge, whichever word the API used.
            repaid = (row is not None and stage is Stage.FAILED and settings.retry_failed
                      and GenerationStatus.of(row.api_status) is GenerationStatus.FAILED)
            if row is None or changed or unposted or repaid:
                plan.new += 1
                if new.kind is Kind.FILE and stage in (Stage.PENDING, Stage.PROJECT_CREATED):
                    plan.upload_bytes += size
                if new.kind is Kind.FILE and new.source_path:
                    secs = await anyio.to_thread.run_sync(audio_seconds, Path(new.source_path))
                    if secs is None:
                        plan.unknown += 1
                    else:
                        plan.known_seconds.append(secs)
                else:
                    plan.unknown += 1
            elif stage is Stage.COMPLETE:
                plan.complete += 1
            elif stage is Stage.FAILED:
                plan.failed += 1
            else:
                plan.in_flight += 1
    stats.rows_total = plan.total
    stats.rows_invalid = plan.invalid
    print_plan(plan, settings, stream)
    return RunResult(exit_code=0, counts={}, stats=stats, ledger=ledger.description)


def print_plan(plan: Plan, settings: Settings, stream: TextIO) -> None:
    """The plan table (plain text, so it reads the same in cron mail)."""
    lines = [
        ("rows total", str(plan.total)),
        ("new (to submit)", str(plan.new)),
        ("complete (skipped)", str(plan.complete)),
        ("failed" + (" (retried)" if settings.retry_failed else " (left as is)"),
         str(plan.failed)),
        ("in flight (polled)", str(plan.in_flight)),
        ("invalid", str(plan.invalid)),
        ("audio minutes (new, known)", f"{plan.minutes():.2f}"),
        ("durations unknown", str(plan.unknown)),
    ]
    if settings.price_per_minute is not None:
        low, expected, high = plan.estimate(settings.price_per_minute)
        lines.append(("estimated cost low", f"${low:,.2f}"))
        lines.append(("estimated cost expected", f"${expected:,.2f}"))
        lines.append(("estimated cost high", f"${high:,.2f}"))
    else:
        lines.append(("estimated cost", "unknown (give --price-per-minute USD)"))
    lines.append(("bytes to upload", format_bytes(plan.upload_bytes)))
    if settings.max_bandwidth is not None:
        seconds = plan.upload_bytes / settings.max_bandwidth
        lines.append((f"upload time at {format_rate(settings.max_bandwidth)}",
                      format_duration(seconds)))
    width = max(len(k) for k, _ in lines)
    print(f"plan for {settings.manifest} (dry run: no API request was made)", file=stream)
    for key, value in lines:
        print(f"  {key.ljust(width)}  {value}", file=stream)
    for model, n in sorted(plan.retired.items()):
        print(f"warning: {n} row{'s' if n != 1 else ''} use{'s' if n == 1 else ''} {model}, "
              f"which today's Diffio API has retired (it serves {', '.join(SUPPORTED_MODELS)}): "
              "against it the run halts at once, exit 3, nothing charged; use --model "
              f"{SUPPORTED_MODELS[0]}, or an API that still serves {model}", file=stream)
    for line, path, size in plan.oversized:
        print(f"warning: {path} (row {line}) is {format_bytes(size)}, over the "
              f"{format_bytes(DOCUMENTED_UPLOAD_LIMIT)} the API takes in one upload: "
              "its row will fail as invalidRow", file=stream)


"""What a run leaves for people and monitors: its summary, ``--report`` and ``--metrics``."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import orjson

from ..errors import SpendLimit
from ..outputs import write_bytes_atomically
from ..run import RunResult
from ..run.stats import RunStats
from ..settings import Settings

__all__ = ["metrics_text", "print_summary", "write_outputs"]


def print_summary(result: RunResult, settings: Settings, *, stream: TextIO = sys.stdout) -> None:
    """The closing lines of ``batcher run``, always printed."""
    c = result.counts
    s = result.stats
    total = sum(c.values())
    print(
        f"batcher: {total} rows: {c.get('complete', 0)} complete, {c.get('failed', 0)} failed, "
        f"{c.get('pending', 0)} pending, {c.get('submitted', 0)} submitted "
        f"({s.done} finished this run, {s.rows_skipped} already complete; "
        f"{s.total_requests} API requests, {s.replays} replays, {s.polls} polls, "
        f"{s.elapsed():.1f} s)",
        file=stream,
    )
    if s.webhooks_on:
        hooks = s.webhook_snapshot()
        refused = {k: n for k, n in hooks["refused"].items() if n}
        print(f"webhooks: {hooks['received']} deliveries, {hooks['recorded']} recorded, "
              f"{hooks['duplicates']} duplicates, {hooks['stale']} stale, "
              f"{hooks['unknown']} unknown, {sum(refused.values())} refused"
              + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(refused.items())) + ")"
                 if refused else "")
              + f"; {hooks['eventsApplied']} rows moved by events, "
              f"{hooks['pollsSaved']} polls saved", file=stream)
    if result.errors:
        print("most common errors:", file=stream)
        for code, message, n in result.errors:
            print(f"  {n} x {code}: {message}", file=stream)
    if isinstance(result.halt_error, SpendLimit):
        print(f"halted by the API's spend limit (402): {result.halt_error.figures()}. "
              "Raise the limit and re-run the same command to resume.", file=stream)
    elif result.halted:
        # Local halts (--max-spend) say how to go on; the others get the generic advice.
        text = result.halted.rstrip(".") + "."
        if "re-run" not in text.lower():
            text += " Fix it and re-run the same command to resume."
        print(f"halted: {text}", file=stream)
    if c.get("complete") and settings.out.exists():
        print(f"restored files: {settings.out}", file=stream)
    print(f"ledger: {result.ledger}", file=stream)


def metrics_text(stats: RunStats, exit_code: int | None,
                 counts: dict[str, int] | None = None) -> str:
    """Prometheus textfile format (for node_exporter's textfile collector).

    Per-run counts are counters (they start from zero with each run, as a
    restarted process's counters do); states are gauges.
    """
    snap = stats.snapshot()
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, Any]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {value}")

    metric("batcher_rows_finished_total", "counter", "Rows finished by the last run, by outcome.",
           [('{outcome="complete"}', snap["completedThisRun"]),
            ('{outcome="failed"}', snap["failedThisRun"])])
    metric("batcher_requests_total", "counter", "API requests of the last run, by endpoint.",
           [(f'{{endpoint="{e}"}}', n) for e, n in sorted(stats.requests_by_endpoint().items())])
    metric("batcher_rate_limited_total", "counter", "429 answers in the last run.",
           [("", snap["rateLimited"])])
    metric("batcher_polls_total", "counter", "Progress polls in the last run.",
           [("", snap["polls"])])
    if stats.webhooks_on:
        hooks = stats.webhook_snapshot()
        metric("batcher_webhook_deliveries_total", "counter",
               "Webhook deliveries received in the last run, by outcome.",
               [(f'{{outcome="{k}"}}', hooks[k]) for k in
                ("recorded", "duplicates", "stale", "unknown", "sinkErrors")]
               + [(f'{{outcome="refused",reason="{r}"}}', n)
                  for r, n in sorted(hooks["refused"].items())])
        metric("batcher_webhook_polls_saved_total", "counter",
               "Rows an event settled before any poll in the last run.",
               [("", hooks["pollsSaved"])])
    if counts is not None:
        metric("batcher_rows", "gauge", "Rows of the job in the ledger, by status.",
               [(f'{{status="{k}"}}', v) for k, v in sorted(counts.items())])
    metric("batcher_run_duration_seconds", "gauge", "How long the last run took.",
           [("", snap["durationSeconds"])])
    metric("batcher_estimated_spend_usd", "gauge",
           "Estimated spend of the last run (with --price-per-minute).",
           [("", snap["estimatedSpendUsd"])])
    metric("batcher_last_exit_code", "gauge", "Exit code of the last run (-1: none).",
           [("", exit_code if exit_code is not None else -1)])
    metric("batcher_last_run_timestamp_seconds", "gauge", "When the last run ended.",
           [("", f"{time.time():.0f}")])
    return "\n".join(out) + "\n"


def write_outputs(settings: Settings, stats: RunStats, exit_code: int | None,
                  counts: dict[str, int] | None = None) -> None:
    """--report (JSON) and --metrics (Prometheus textfile), written atomically.

    ``counts`` are the ledger's rows by status at the end (the whole job, not
    only what this run touched).
    """
    if settings.report is not None:
        report: dict[str, Any] = {"exitCode": exit_code, "counts": counts, **stats.snapshot(),
                                  "settings": settings.describe()}
        polls_per_row = stats.polls / max(stats.submitted, 1)
        report["pollsPerRow"] = round(polls_per_row, 3)
        write_bytes_atomically(settings.report, orjson.dumps(report, default=str,
                                                             option=orjson.OPT_INDENT_2))
    if settings.metrics is not None:
        write_bytes_atomically(settings.metrics, metrics_text(stats, exit_code, counts).encode())

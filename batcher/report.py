"""What a person reads: the run summary, ``batcher status``, report files."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from .errors import SpendLimit
from .ledger import open_ledger
from .model import READER_COMMAND, RunInfo, Stage, contract_status
from .outputs import write_bytes_atomically
from .run import RunResult
from .runstats import RunStats
from .settings import Settings

__all__ = ["metrics_text", "print_summary", "status_main", "write_outputs"]


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


def _table(rows: Sequence[tuple[str, ...]], headers: tuple[str, ...], stream: TextIO) -> None:
    if stream.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        Console(file=stream).print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
          file=stream)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(),
              file=stream)


async def status_main(url: str, as_json: bool, stream: TextIO = sys.stdout) -> int:
    """``batcher status LEDGER``: counts, errors, runs; works while a run writes."""
    ledger = open_ledger(url)
    await ledger.open(RunInfo.reader(), lock=False)
    try:
        by_stage = await ledger.counts()
        errors = await ledger.error_summary(5)
        runs = await ledger.runs()
    finally:
        await ledger.close(None)
    by_status: dict[str, int] = {"pending": 0, "submitted": 0, "complete": 0, "failed": 0}
    for stage, n in by_stage.items():
        by_status[contract_status(stage)] += n
    total = sum(by_status.values())
    runs = [r for r in runs if str(r.get("command", "")) != READER_COMMAND]
    last = runs[-1] if runs else None
    if as_json:
        stream.write(orjson.dumps({
            "ledger": url, "total": total, "byStatus": by_status,
            "byStage": {s.value: n for s, n in by_stage.items()},
            "topErrors": [{"code": c, "message": m, "count": n} for c, m, n in errors],
            "lastRun": last,
        }, default=str).decode() + "\n")
        return 0
    rows = [(status, str(by_status[status]), f"{100 * by_status[status] / total:.1f}%"
             if total else "-") for status in ("complete", "failed", "submitted", "pending")]
    rows.append(("total", str(total), ""))
    _table(rows, ("status", "rows", "share"), stream)
    detail = [(s.value, str(by_stage.get(s, 0))) for s in Stage if by_stage.get(s)]
    if detail:
        print("stages: " + ", ".join(f"{k} {v}" for k, v in detail), file=stream)
    if errors:
        print("most common errors:", file=stream)
        for code, message, n in errors:
            print(f"  {n} x {code}: {message}", file=stream)
    if last:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last["started_at"])))
        ended = last.get("ended_at")
        if ended:
            took = float(ended) - float(last["started_at"])
            print(f"last run: started {started} on {last.get('host')} (pid {last.get('pid')}), "
                  f"took {took:.1f} s, exit {last.get('exit_code')}", file=stream)
        else:
            elapsed = time.time() - float(last["started_at"])
            done = by_status["complete"] + by_status["failed"]
            left = by_status["pending"] + by_status["submitted"]
            line = (f"running: started {started} on {last.get('host')} "
                    f"(pid {last.get('pid')}), {elapsed:.0f} s ago")
            if done and left:
                line += f"; {done / elapsed:.1f} rows/s, ETA {left / (done / elapsed):.0f} s"
            print(line, file=stream)
    return 0


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

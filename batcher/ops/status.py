"""``batcher status``: counts by status, the most common errors, the API's queue, the last run."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

import orjson

from ..ledger import open_ledger
from ..model import READER_COMMAND, RunInfo, Stage, status_counts

__all__ = ["status_main", "webhook_line"]


def webhook_line(counts: dict[str, int]) -> str:
    """One line of webhook counters: received, recorded, refused by reason, polls saved."""
    refused = {k.removeprefix("refused."): n for k, n in counts.items()
               if k.startswith("refused.") and n}
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(refused.items()))
    return (f"webhooks: {counts.get('received', 0)} deliveries received, "
            f"{counts.get('recorded', 0)} recorded, {counts.get('duplicates', 0)} duplicates, "
            f"{counts.get('stale', 0)} stale, {counts.get('unknown', 0)} unknown, "
            f"{sum(refused.values())} refused" + (f" ({why})" if why else "")
            + f"; polls saved {counts.get('pollsSaved', 0)}")


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
        # Where submitted generations wait in the API's queue, as last polled.
        queued = [row.queue_position async for row in ledger.rows(
            stages=frozenset({Stage.SUBMITTED})) if row.queue_position is not None]
        hooks = await ledger.webhook_counts()
    finally:
        await ledger.close(None)
    by_status = status_counts(by_stage)
    total = sum(by_status.values())
    runs = [r for r in runs if str(r.get("command", "")) != READER_COMMAND]
    last = runs[-1] if runs else None
    if as_json:
        stream.write(orjson.dumps({
            "ledger": url, "total": total, "byStatus": by_status,
            "byStage": {s.value: n for s, n in by_stage.items()},
            "topErrors": [{"code": c, "message": m, "count": n} for c, m, n in errors],
            "queued": {"count": len(queued), "front": min(queued, default=None),
                       "back": max(queued, default=None)},
            "lastRun": last,
            "webhooks": hooks,
        }, default=str).decode() + "\n")
        return 0
    rows = [(status, str(by_status[status]), f"{100 * by_status[status] / total:.1f}%"
             if total else "-") for status in ("complete", "failed", "submitted", "pending")]
    rows.append(("total", str(total), ""))
    _table(rows, ("status", "rows", "share"), stream)
    detail = [(s.value, str(by_stage.get(s, 0))) for s in Stage if by_stage.get(s)]
    if detail:
        print("stages: " + ", ".join(f"{k} {v}" for k, v in detail), file=stream)
    if queued:
        first, back = min(queued), max(queued)
        where = f"position {first}" if first == back else f"positions {first}-{back}"
        print(f"queued at the API: {len(queued)} generations ({where}, 1 is next; "
              "as last polled)", file=stream)
    if hooks:
        print(webhook_line(hooks), file=stream)
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

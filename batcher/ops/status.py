"""``batcher status``: counts by status, the most common errors, the API's queue, the last run."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from ..ledger import open_ledger
from ..ledger.base import is_shared
from ..model import READER_COMMAND, RunInfo, Stage, status_counts

__all__ = ["pid_alive", "run_state", "status_main", "webhook_line"]


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def run_state(run: dict[str, Any], *, host: str,
              live_workers: Sequence[dict[str, Any]] | None = None) -> str:
    """How a recorded run stands.

    * ``ended``: it recorded its end and its exit code;
    * ``interrupted``: it recorded its end without an exit code (a signal);
    * ``running``: no end yet, and its process is alive on this host, or on
      another host a worker of it still heartbeats (a shared ledger);
    * ``died``: no end, and its process is gone (killed, crashed, power loss),
      or on a shared ledger no worker of it heartbeats any more;
    * ``unknown``: no end, on another host, with nothing to check it by.

    ``live_workers``: the shared ledger's live workers (None: not shared).
    """
    if run.get("ended_at") is not None:
        return "ended" if run.get("exit_code") is not None else "interrupted"
    run_host, pid = str(run.get("host", "")), int(run.get("pid") or 0)
    if live_workers is not None and any(w.get("run_id") == run.get("run_id")
                                        for w in live_workers):
        return "running"
    if run_host == host:
        return "running" if pid_alive(pid) else "died"
    return "unknown" if live_workers is None else "died"
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


async def status_main(url: str, as_json: bool, stream: TextIO | None = None, *,
                      label: str | None = None) -> int:
    """``batcher status LEDGER``: counts, errors, runs; works while a run writes.

    ``stream`` defaults to the ``sys.stdout`` of the moment of the call.
    ``label`` names the ledger in the JSON when ``url`` is not its name (a
    job not run yet is read from an empty ``:memory:`` ledger).
    """
    stream = sys.stdout if stream is None else stream
    ledger = open_ledger(url)
    await ledger.open(RunInfo.reader(), lock=False)
    try:
        by_stage = await ledger.counts()
        errors = await ledger.error_summary(5)
        runs = await ledger.runs()
        # Where submitted generations wait in the API's queue, as last polled.
        queued = [row.queue_position async for row in ledger.rows(
            stages=frozenset({Stage.SUBMITTED})) if row.queue_position is not None]
        # On a shared ledger, workers heartbeat: a run on another host is
        # alive while one of its workers is.
        workers: Sequence[dict[str, Any]] | None = None
        if is_shared(ledger):
            workers = await ledger.live_workers()
        hooks = await ledger.webhook_counts()
    finally:
        await ledger.close(None)
    by_status = status_counts(by_stage)
    total = sum(by_status.values())
    runs = [r for r in runs if str(r.get("command", "")) != READER_COMMAND]
    last = runs[-1] if runs else None
    state = None
    if last is not None:
        state = run_state(last, host=socket.gethostname(), live_workers=workers)
        last = {**last, "state": state}
    if as_json:
        stream.write(orjson.dumps({
            "ledger": label or url, "total": total, "byStatus": by_status,
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
        started = _when(last["started_at"])
        ended = last.get("ended_at")
        who = f"on {last.get('host')} (pid {last.get('pid')})"
        if ended:
            took = float(ended) - float(last["started_at"])
            how = (f"exit {last.get('exit_code')}" if state == "ended"
                   else "interrupted (no exit code recorded)")
            print(f"last run: started {started} {who}, ended {_when(ended)} after "
                  f"{took:.1f} s, {how}", file=stream)
        elif state == "died":
            print(f"last run: started {started} {who}, died: its process is gone and it "
                  "recorded no end (killed or crashed); run the same command to resume",
                  file=stream)
        elif state == "unknown":
            print(f"last run: started {started} {who}, recorded no end; it may still run "
                  "there (it cannot be checked from this host)", file=stream)
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


def _when(stamp: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(stamp)))

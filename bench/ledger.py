"""Row transitions per second on the SQLite ledger (group commit), no network.

``SqliteLedger`` is driven directly by many concurrent callers, each moving
its rows the way the runner does for an ``apiProjectId`` row: PENDING ->
SUBMITTED (generation id, status, attempts), then SUBMITTED -> COMPLETE. The
ledger file is on the temp folder's disk with ``synchronous=FULL``, so every
group commit is a real fsync. Like the runner, each caller passes the row it
moves (``current=``), so the ledger does not read the whole row back;
``--no-current`` measures the full read-back. Runs in its own process::

    python -m bench.ledger --rows 20000 --callers 256 [--no-current]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import PYTHON, Figure, run_child, section

__all__ = ["bench_ledger", "main", "measure"]


async def measure(path: Path, rows: int, callers: int, current: bool = True) -> dict[str, Any]:
    """Import ``rows`` rows, then time 2 transitions per row from ``callers`` tasks."""
    import anyio

    from batcher.ledger import SqliteLedger
    from batcher.model import Kind, NewRow, RunInfo, Stage

    led = SqliteLedger(path)
    await led.open(RunInfo("bench", os.getpid(), socket.gethostname(), time.time(), "bench"))
    try:
        news = [
            NewRow(row_id=f"r{i}", line=i + 1, kind=Kind.API_PROJECT,
                   idempotency_key=f"bk1-{i:064x}",
                   model_key="diffio-3.5", api_project_id=f"proj-{i}", sampling={"seed": i},
                   request_digest=f"{i:032x}", group=f"bk1-{i:064x}|project:proj-{i}")
            for i in range(rows)
        ]
        imported = []
        t0 = time.perf_counter()
        for start in range(0, rows, 256):  # the planner's batch size
            imported += await led.import_rows(news[start:start + 256])
        import_s = time.perf_counter() - t0
        commits0, jobs0 = led.commit_stats

        async def caller(k: int) -> None:
            for i in range(k, rows, callers):
                rid = f"r{i}"
                row = await led.transition(
                    rid, Stage.PENDING, Stage.SUBMITTED,
                    {"generation_id": f"gen-{i}", "api_project_id": f"proj-{i}",
                     "api_status": "queued", "attempts_delta": 1},
                    event="submitted", detail={"generationId": f"gen-{i}", "replay": False},
                    current=imported[i] if current else None)
                await led.transition(rid, Stage.SUBMITTED, Stage.COMPLETE,
                                     {"api_status": "complete", "polls_delta": 1},
                                     event="complete", current=row if current else None)

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t1 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for k in range(callers):
                tg.start_soon(caller, k)
        seconds = time.perf_counter() - t1
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        commits, jobs = led.commit_stats
        counts = await led.counts()
        assert counts.get(Stage.COMPLETE) == rows, counts
    finally:
        await led.close(0)
    transitions = 2 * rows
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "rows": rows,
        "callers": callers,
        "current": current,
        "transitions": transitions,
        "seconds": round(seconds, 4),
        "per_second": round(transitions / seconds),
        "cpu_us_per_transition": round(1e6 * cpu / transitions, 1),
        "commits": commits - commits0,
        "jobs_per_commit": round((jobs - jobs0) / max(1, commits - commits0), 1),
        "import_rows_per_second": round(rows / import_s),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line of the ledger child; prints one JSON object."""
    import anyio

    ap = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--callers", type=int, default=256)
    ap.add_argument("--no-current", dest="current", action="store_false",
                    help="do not pass current=: the ledger reads every moved row back")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batcher-bench-ledger-") as d:
        result = anyio.run(measure, Path(d) / "bench.ledger.sqlite", args.rows, args.callers,
                           args.current, backend="asyncio")
    print(json.dumps(result))
    return 0


def bench_ledger(rows: int = 20_000, callers: tuple[int, ...] = (64, 256, 1024)
                 ) -> tuple[list[dict[str, Any]], list[Figure]]:
    """One child per caller count; the figure is the best of them."""
    section(f"ledger: SqliteLedger, {rows:,} rows x 2 transitions, concurrent callers {callers}")
    results: list[dict[str, Any]] = []
    for n in callers:
        child = run_child([PYTHON, "-m", "bench.ledger", "--rows", str(rows),
                           "--callers", str(n)]).check()
        res = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"{n:5} callers: {res['per_second']:,} transitions/s, "
              f"{res['cpu_us_per_transition']} us CPU each, {res['commits']} commits "
              f"({res['jobs_per_commit']} per commit); import {res['import_rows_per_second']:,} "
              f"rows/s")
    best = max(results, key=lambda r: r["per_second"])
    fig = Figure("ledger transitions per second (SQLite)", f"{best['per_second']:,}/s",
                 ">= 20,000/s", best["per_second"] >= 20_000,
                 ", ".join(f"{r['callers']} callers {r['per_second']:,}/s" for r in results))
    return results, [fig]


if __name__ == "__main__":
    sys.exit(main())

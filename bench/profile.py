"""cProfile of the throughput run, written to files for bench/FINDINGS.md.

cProfile sees the event-loop thread only; the ledger's writer thread and the
``to_thread`` workers are not in the profile (their share shows as the gap
between the profile's total and the process's CPU). Its clock is wall time,
so ``select.epoll.poll`` is mostly the loop waiting, not CPU. Call counts are
exact, and the per-row counts printed (event-loop iterations, yields to the
loop, ledger calls) are the cheapest view of where per-row overhead comes from.
"""

from __future__ import annotations

import io
import pstats
from pathlib import Path

from .common import SimProcess, batcher_run, section, workdir, write_project_manifest

__all__ = ["profile_rate"]


def profile_rate(out_dir: Path, rows: int = 3000, rate: float = 1000.0, concurrency: int = 64,
                 top: int = 40) -> Path:
    """Profile one throughput run; write ``rate.prof`` and ``rate-top.txt`` into ``out_dir``."""
    section(f"profile: {rows} rows at --rate {rate:g} under cProfile -> {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    prof = out_dir / "rate.prof"
    with workdir() as d, SimProcess("--duration", "0,0") as sim:
        manifest = write_project_manifest(d / "prof.csv", rows, prefix="prof")
        run = batcher_run(manifest, sim.base_url, "--rate", f"{rate:g}",
                          "--concurrency", str(concurrency), "--poll-interval", "0",
                          python_args=["-m", "cProfile", "-o", str(prof)]).check()
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    buf.write(f"process CPU {run.cpu:.2f} s (user {run.user:.2f}, sys {run.sys:.2f}), "
              f"wall {run.wall:.2f} s, {rows} rows\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    buf.write("\nper row (call counts / rows):\n")
    for label, per_row in per_row_counts(stats, rows):
        buf.write(f"  {per_row:7.2f}  {label}\n")
    text = out_dir / "rate-top.txt"
    text.write_text(buf.getvalue())
    for label, per_row in per_row_counts(stats, rows):
        print(f"  {per_row:7.2f} per row: {label}")
    print(f"profile: {prof}; top functions: {text} (process CPU {run.cpu:.2f} s under the "
          f"profiler, {1000 * run.cpu / rows:.2f} ms/row)")
    return text


# (file suffix, function name, label, divisor) of calls worth counting per row.
# cProfile counts every resumption of a coroutine or generator as a call: the
# divisor turns those back into calls (each of these suspends exactly once).
_COUNTED = (
    ("asyncio/base_events.py", "_run_once", "event-loop iterations", 1),
    ("asyncio/events.py", "_run", "callbacks run by the loop", 1),
    ("asyncio/base_events.py", "call_at", "timers scheduled", 1),
    ("asyncio/tasks.py", "__sleep0", "bare yields to the loop (sleep(0): anyio checkpoints)", 2),
    ("anyio/to_thread.py", "run_sync", "hops to a worker thread (anyio.to_thread)", 2),
    ("batcher/ledger/sqlite.py", "_transition_params", "ledger transitions", 1),
    ("aiohttp/client_reqrep.py", "__init__", "HTTP requests and responses built by aiohttp", 1),
)


def per_row_counts(stats: pstats.Stats, rows: int) -> list[tuple[str, float]]:
    """Call counts of a few telling functions, divided by ``rows``."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = \
        stats.stats  # type: ignore[attr-defined]
    out: list[tuple[str, float]] = []
    for suffix, name, label, divisor in _COUNTED:
        calls = sum(v[1] for k, v in table.items() if k[2] == name and k[0].endswith(suffix))
        out.append((label, calls / divisor / max(1, rows)))
    return out

"""cProfile of the throughput run, written to files for bench-findings.md.

cProfile sees the event-loop thread only; the ledger's writer thread and the
``to_thread`` workers are not in the profile (their share shows as the gap
between the profile's total and the process's CPU).
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
    text = out_dir / "rate-top.txt"
    text.write_text(buf.getvalue())
    print(f"profile: {prof}; top functions: {text} (process CPU {run.cpu:.2f} s under the "
          f"profiler, {1000 * run.cpu / rows:.2f} ms/row)")
    return text

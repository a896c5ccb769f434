"""Peak memory of the batcher process: a huge dry run and a large real run.

Peak RSS is the child's ``ru_maxrss`` (from ``os.wait4``), so it includes
the interpreter and every import: the figure a user's machine sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import (
    ChildRun,
    Figure,
    SimProcess,
    api_requests,
    batcher_run,
    measured_batcher_run,
    section,
    workdir,
    write_project_manifest,
)

__all__ = ["MemoryResult", "bench_memory"]


@dataclass(slots=True)
class MemoryResult:
    """The two runs."""

    dry_rows: int
    dry: ChildRun
    real_rows: int
    real: ChildRun
    real_requests: int


def bench_memory(dry_rows: int = 1_000_000, real_rows: int = 100_000, *, rate: float = 2000.0,
                 concurrency: int = 64) -> tuple[MemoryResult, list[Figure]]:
    """``--dry-run`` of ``dry_rows`` rows, then a real run of ``real_rows`` rows."""
    section(f"memory: --dry-run of {dry_rows:,} rows; real run of {real_rows:,} rows at "
            f"--rate {rate:g} --concurrency {concurrency}, generations done at once")
    with workdir() as d:
        big = write_project_manifest(d / "dry.csv", dry_rows, prefix="dry")
        size_mb = big.stat().st_size / 1e6
        dry = batcher_run(big, None, "--dry-run", timeout=3600).check()
        print(f"dry run: {dry_rows:,} rows ({size_mb:.0f} MB of CSV): peak RSS "
              f"{dry.maxrss_mb:.0f} MB, wall {dry.wall:.1f} s, CPU {dry.cpu:.1f} s "
              f"= {1e6 * dry.cpu / dry_rows:.1f} us/row")
        big.unlink()
    with workdir() as d, SimProcess("--duration", "0,0") as sim:
        manifest = write_project_manifest(d / "real.csv", real_rows, prefix="real")
        real, delta = measured_batcher_run(sim, manifest, "--rate", f"{rate:g}",
                                           "--concurrency", str(concurrency),
                                           "--poll-interval", "0", timeout=3600)
    requests = api_requests(delta)
    ideal = requests / rate
    print(f"real run: {real_rows:,} rows: peak RSS {real.maxrss_mb:.0f} MB, wall {real.wall:.1f} s "
          f"({real.wall / ideal:.2f}x the ideal {ideal:.1f} s), CPU {real.cpu:.1f} s = "
          f"{1000 * real.cpu / real_rows:.3f} ms/row; {delta}")
    res = MemoryResult(dry_rows, dry, real_rows, real, requests)
    figures = [
        Figure(f"peak RSS, --dry-run of {dry_rows:,} rows", f"{dry.maxrss_mb:.0f} MB",
               "<= 150 MB", dry.maxrss_mb <= 150, f"wall {dry.wall:.0f} s"),
        Figure(f"peak RSS, real run of {real_rows:,} rows", f"{real.maxrss_mb:.0f} MB",
               "<= 200 MB", real.maxrss_mb <= 200,
               f"wall {real.wall:.0f} s = {real.wall / ideal:.2f}x ideal at --rate {rate:g}; "
               f"CPU {1000 * real.cpu / real_rows:.3f} ms/row"),
    ]
    return res, figures

"""A big catalog: a real run of 10^6 project rows against the simulator.

Kept out of the default benchmark (``python -m bench --big``, ``--big-rows
N``): on 2 shared cores it takes tens of minutes. The simulator runs in its
own process; generations finish at once, so the run is pure throughput. The
figures are the batcher process's peak RSS (memory must follow the rows in
flight, not the rows in the manifest) and its CPU per row, to set beside the
3,000-row rate run's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import (
    ChildRun,
    Figure,
    SimProcess,
    api_requests,
    measured_batcher_run,
    section,
    workdir,
    write_project_manifest,
)

__all__ = ["BigResult", "bench_big"]


@dataclass(slots=True)
class BigResult:
    """One big run."""

    rows: int
    rate: float
    run: ChildRun
    requests: int

    @property
    def cpu_ms_per_row(self) -> float:
        return 1000.0 * self.run.cpu / self.rows


def bench_big(rows: int = 1_000_000, *, rate: float = 1000.0, concurrency: int = 64,
              small_cpu_ms: float | None = None) -> tuple[BigResult, list[Figure]]:
    """Run ``rows`` rows; ``small_cpu_ms`` is the rate run's CPU per row, to compare."""
    section(f"big catalog: a real run of {rows:,} rows at --rate {rate:g} "
            f"--concurrency {concurrency}, generations done at once")
    with workdir() as d, SimProcess("--duration", "0,0") as sim:
        manifest = write_project_manifest(d / "big.csv", rows, prefix="big")
        size_mb = manifest.stat().st_size / 1e6
        run, delta = measured_batcher_run(sim, manifest, "--rate", f"{rate:g}",
                                          "--concurrency", str(concurrency),
                                          "--poll-interval", "0", timeout=6 * 3600)
    res = BigResult(rows, rate, run, api_requests(delta))
    ideal = res.requests / rate
    print(f"{rows:,} rows ({size_mb:.0f} MB of CSV): peak RSS {run.maxrss_mb:.0f} MB; wall "
          f"{run.wall:.0f} s = {rows / run.wall:.0f} rows/s ({run.wall / ideal:.2f}x the ideal "
          f"{ideal:.0f} s); CPU {run.cpu:.0f} s = {res.cpu_ms_per_row:.3f} ms/row; {delta}")
    note = f"wall {run.wall:.0f} s, {rows / run.wall:.0f} rows/s at --rate {rate:g}"
    figures = [Figure(f"peak RSS, real run of {rows:,} rows", f"{run.maxrss_mb:.0f} MB",
                      "<= 200 MB", run.maxrss_mb <= 200, note)]
    value = f"{res.cpu_ms_per_row:.3f} ms"
    if small_cpu_ms is not None:
        value += f" ({res.cpu_ms_per_row / small_cpu_ms:.2f}x the rate run's)"
    figures.append(Figure(f"CPU per row, real run of {rows:,} rows", value,
                          "<= the rate run's",
                          None if small_cpu_ms is None else
                          res.cpu_ms_per_row <= small_cpu_ms * 1.05,
                          "within 5 % (noise on shared cores)"))
    return res, figures

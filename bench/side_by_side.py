"""The SDK baseline and batcher on the same simulator and the same manifest.

One simulator (generations take 2-4 s) serves both, one after the other; the
requests each made are the difference of the simulator's counters around its
run. Both run as child processes, so wall, CPU and peak memory are theirs
alone. The baseline is SDK 0.1.92, which speaks the seed-era API only
(diffio-3.5): the simulator serves that generation here, and batcher runs
with ``--model diffio-3.5`` on it, so both make the same requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .common import (
    PYTHON,
    ChildRun,
    Figure,
    SimProcess,
    api_requests,
    batcher_run,
    run_child,
    section,
    stats_delta,
    workdir,
    write_project_manifest,
)

__all__ = ["SEED_MODEL", "Side", "bench_side_by_side"]

# The model SDK 0.1.92 posts by default: the seed era's.
SEED_MODEL = "diffio-3.5"


@dataclass(slots=True)
class Side:
    """One contender's figures."""

    name: str
    run: ChildRun
    rows: int
    requests: dict[str, int]

    @property
    def api(self) -> int:
        return api_requests(self.requests)

    @property
    def per_row(self) -> float:
        return self.api / self.rows

    @property
    def cpu_ms(self) -> float:
        return 1000.0 * self.run.cpu / self.rows

    @property
    def polls_per_row(self) -> float:
        return self.requests.get("get_generation_progress", 0) / self.rows


def bench_side_by_side(rows: int = 300, *, rate: float = 50.0, threads: int = 16,
                       sdk_poll: float = 2.0, batcher_poll: float = 2.0,
                       duration: str = "2,4") -> tuple[list[Side], list[Figure]]:
    """Run both on one simulator; print a comparison and return figures."""
    section(f"side by side: {rows} rows, generations take {duration} s; SDK: {threads} threads, "
            f"create_and_wait polling every {sdk_poll:g} s; batcher: --rate {rate:g} "
            f"--poll-interval {batcher_poll:g}")
    with workdir() as d, SimProcess("--duration", duration, "--seed", "7", api="seed") as sim:
        manifest = write_project_manifest(d / "side.csv", rows, prefix="side")
        before = sim.counts()
        sdk = run_child([PYTHON, "-m", "bench.sdk_baseline", "--base-url", sim.base_url,
                         "--manifest", str(manifest), "--threads", str(threads),
                         "--poll-interval", f"{sdk_poll:g}"]).check()
        middle = sim.counts()
        bat = batcher_run(manifest, sim.base_url, "--rate", f"{rate:g}", "--model", SEED_MODEL,
                          "--poll-interval", f"{batcher_poll:g}").check()
        after = sim.counts()
    outcome = json.loads(sdk.stdout.strip().splitlines()[-1])
    sides = [Side("SDK, 16 threads", sdk, rows, stats_delta(before, middle)),
             Side("batcher", bat, rows, stats_delta(middle, after))]
    print(f"SDK baseline outcome: {outcome}")
    head = f"{'':18}{'wall s':>9}{'CPU ms/row':>12}{'req/row':>9}{'polls/row':>11}{'RSS MB':>8}"
    print(head)
    for s in sides:
        print(f"{s.name:18}{s.run.wall:9.2f}{s.cpu_ms:12.3f}{s.per_row:9.2f}"
              f"{s.polls_per_row:11.2f}{s.run.maxrss_mb:8.0f}")
    sdk_side, bat_side = sides
    wall_ratio = bat_side.run.wall / sdk_side.run.wall
    cpu_ratio = bat_side.cpu_ms / sdk_side.cpu_ms
    req_ratio = bat_side.per_row / sdk_side.per_row
    print(f"batcher / SDK: wall {wall_ratio:.2f}x, CPU per row {cpu_ratio:.2f}x, "
          f"requests per row {req_ratio:.2f}x")
    figures = [
        Figure("side by side: wall (batcher / SDK)",
               f"{wall_ratio:.2f}x ({bat_side.run.wall:.1f} s / {sdk_side.run.wall:.1f} s)",
               note=f"{rows} rows, durations {duration} s, batcher --rate {rate:g}"),
        Figure("side by side: CPU per row (batcher / SDK)",
               f"{cpu_ratio:.2f}x ({bat_side.cpu_ms:.2f} / {sdk_side.cpu_ms:.2f} ms)"),
        Figure("side by side: requests per row (batcher / SDK)",
               f"{req_ratio:.2f}x ({bat_side.per_row:.2f} / {sdk_side.per_row:.2f})"),
    ]
    return sides, figures

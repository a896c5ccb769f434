"""Rate efficiency and CPU per row: generations that finish at once, a high rate.

With ``--duration 0,0`` every generation is complete when created, so the
job is pure request throughput: the ceiling is (API requests made) / rate.
The same run gives the CPU per row of the batcher process. A run on an empty
manifest measures the fixed cost (interpreter start, imports, ledger open),
shown apart so the per-row cost at other sizes can be worked out.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .common import (
    PYTHON,
    ROOT,
    ChildRun,
    Figure,
    SimProcess,
    api_requests,
    batcher_run,
    endpoint_counts,
    run_child,
    section,
    stats_delta,
    workdir,
    write_project_manifest,
)
from .sdk_current import SDK_DIR

__all__ = ["RateResult", "bench_rate", "fixed_cost"]


@dataclass(slots=True)
class RateResult:
    """Figures of one throughput run."""

    rows: int
    rate: float
    requests: int
    run: ChildRun
    fixed: ChildRun
    max_rps: int
    sdk: ChildRun | None = None  # the SDK's own way on the same simulator, when installed
    sdk_requests: int = 0
    first_request: float | None = None  # seconds from spawn to the simulator's first request

    @property
    def ideal(self) -> float:
        return self.requests / self.rate

    @property
    def in_run(self) -> float:
        """The run's own duration (from its report): process start-up left out."""
        return float(self.run.report.get("durationSeconds", self.run.wall))

    @property
    def cpu_ms_per_row(self) -> float:
        return 1000.0 * self.run.cpu / self.rows

    @property
    def net_cpu_ms_per_row(self) -> float:
        return 1000.0 * max(0.0, self.run.cpu - self.fixed.cpu) / self.rows

    @property
    def sdk_cpu_ms_per_row(self) -> float | None:
        return None if self.sdk is None else 1000.0 * self.sdk.cpu / self.rows


def timeline(run: ChildRun, ledger: Path) -> dict[str, float]:
    """Where the wall time went, from the ledger's own timestamps.

    ``startup``: spawn to the run's record; ``ramp``: to the first accepted
    generation; ``steady``: first to last accepted; ``tail``: last accepted to
    the run's end record; ``shutdown``: to the process being reaped.
    """
    with closing(sqlite3.connect(ledger)) as conn:
        started, ended = conn.execute(
            "SELECT started_at, ended_at FROM ledger_runs ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        first, last, n = conn.execute(
            "SELECT MIN(at), MAX(at), COUNT(*) FROM ledger_events "
            "WHERE event IN ('submitted', 'replayed')"
        ).fetchone()
    if first is None or ended is None:
        return {}
    end = run.spawned_at + run.wall
    return {"startup": started - run.spawned_at, "ramp": first - started,
            "steady": last - first, "tail": ended - last, "shutdown": end - ended,
            "accepted": float(n)}


def fixed_cost(base_url: str, folder: Path) -> ChildRun:
    """A run on a header-only manifest: start-up and shutdown, no rows."""
    path = write_project_manifest(folder / "empty.csv", 0)
    return batcher_run(path, base_url).check()


def bench_rate(rows: int = 3000, rate: float = 1000.0, concurrency: int = 64,
               poll_interval: float = 0.0) -> tuple[RateResult, list[Figure]]:
    """Run the throughput benchmark; print its lines and return its figures."""
    section(f"rate efficiency and CPU: {rows} apiProjectId rows, generations done at once, "
            f"--rate {rate:g} --concurrency {concurrency} --poll-interval {poll_interval:g}")
    with workdir() as d, SimProcess("--duration", "0,0") as sim:
        fixed = fixed_cost(sim.base_url, d)
        manifest = write_project_manifest(d / "rate.csv", rows, prefix="rate")
        before = sim.counts()
        run = batcher_run(manifest, sim.base_url, "--rate", f"{rate:g}",
                          "--concurrency", str(concurrency),
                          "--poll-interval", f"{poll_interval:g}").check()
        stats = sim.stats()
        phases = timeline(run, manifest.with_suffix(".ledger.sqlite"))
        sdk, sdk_requests = _sdk_run(sim, manifest, concurrency)
    delta = stats_delta(before, endpoint_counts(stats))
    res = RateResult(rows=rows, rate=rate, requests=api_requests(delta), run=run, fixed=fixed,
                     max_rps=int(stats.get("max_requests_per_second", 0)), sdk=sdk,
                     sdk_requests=sdk_requests,
                     first_request=None if stats.get("first_request_at") is None
                     else float(stats["first_request_at"]) - run.spawned_at)
    print(f"API requests: {res.requests} ({res.requests / rows:.2f} per row) {delta}")
    print(f"ideal = requests / rate = {res.ideal:.2f} s")
    print(f"process wall {run.wall:.2f} s = {run.wall / res.ideal:.3f}x ideal; "
          f"in-run (report) {res.in_run:.2f} s = {res.in_run / res.ideal:.3f}x ideal; "
          f"start-up + shutdown alone {fixed.wall:.2f} s")
    if phases:
        n = int(phases["accepted"])
        paced = (n - 1) / rate
        print(f"timeline: start-up {phases['startup']:.2f} s, ramp to the first accepted "
              f"{phases['ramp']:.2f} s, steady {phases['steady']:.2f} s for {n} accepted "
              f"({phases['steady'] / paced:.3f}x the {paced:.2f} s the rate allows), "
              f"tail {phases['tail']:.2f} s, shutdown {phases['shutdown']:.2f} s")
    if res.first_request is not None:
        print(f"time to the first request: {1000 * res.first_request:.0f} ms from spawn "
              f"(the simulator's clock of its first request)")
    print(f"busiest 1 s window at the simulator: {res.max_rps} requests (rate {rate:g})")
    print(f"CPU {run.cpu:.2f} s (user {run.user:.2f} + sys {run.sys:.2f}) = "
          f"{res.cpu_ms_per_row:.3f} ms/row; fixed cost {fixed.cpu:.2f} s, "
          f"net {res.net_cpu_ms_per_row:.3f} ms/row; peak RSS {run.maxrss_mb:.0f} MB")
    sdk_ms = res.sdk_cpu_ms_per_row
    if res.first_request is not None:
        figures_first = [Figure("time to the first request", f"{1000 * res.first_request:.0f} ms",
                                "<= 120 ms", res.first_request <= 0.120,
                                f"fixed cost of an empty manifest: {1000 * fixed.wall:.0f} ms "
                                f"wall, {1000 * fixed.cpu:.0f} ms CPU")]
    else:
        figures_first = []
    if res.sdk is not None and sdk_ms is not None:
        print(f"the SDK's way ({concurrency} threads of create_generation + "
              f"wait_for_generation, SDK 0.3.10): CPU {res.sdk.cpu:.2f} s = {sdk_ms:.3f} ms/row, "
              f"wall {res.sdk.wall:.2f} s, {res.sdk_requests / rows:.2f} requests per row; "
              f"batcher / SDK CPU per row {res.cpu_ms_per_row / sdk_ms:.2f}x")
    figures = [
        Figure(f"rate efficiency ({rows} rows, wall/ideal)",
               f"{run.wall / res.ideal:.3f}x ({run.wall:.2f} s / {res.ideal:.2f} s)",
               "<= 1.05x", run.wall / res.ideal <= 1.05,
               f"in-run {res.in_run / res.ideal:.3f}x; busiest 1 s window "
               f"{res.max_rps} req at --rate {rate:g}"),
        Figure(f"CPU per row ({rows} rows)",
               f"{res.cpu_ms_per_row:.3f} ms",
               "<= 0.5 ms", res.cpu_ms_per_row <= 0.5,
               f"user {run.user:.2f} s + sys {run.sys:.2f} s; "
               f"{res.net_cpu_ms_per_row:.3f} ms/row net of the {fixed.cpu:.2f} s start-up"),
    ]
    figures += figures_first
    if sdk_ms is not None:
        ratio = res.cpu_ms_per_row / sdk_ms
        figures.append(Figure(f"CPU per row, batcher / the SDK's way ({rows} rows)",
                              f"{ratio:.2f}x ({res.cpu_ms_per_row:.3f} / {sdk_ms:.3f} ms)",
                              "<= 0.35x", ratio <= 0.35,
                              f"SDK 0.3.10, {concurrency} threads, same simulator"))
    else:
        figures.append(Figure(f"CPU per row, batcher / the SDK's way ({rows} rows)", "skipped",
                              note=f"SDK 0.3.10 is not installed in {SDK_DIR.name}/"))
    return res, figures


def _sdk_run(sim: SimProcess, manifest: Path, threads: int) -> tuple[ChildRun | None, int]:
    """The SDK's own way on the same rows (fresh keys): its CPU, and the requests it made."""
    if not (SDK_DIR / "diffio").is_dir():
        return None, 0
    before = sim.counts()
    run = run_child([PYTHON, "-m", "bench.sdk_current", "--base-url", sim.base_url,
                     "--manifest", str(manifest), "--threads", str(threads)],
                    env={"PYTHONPATH": os.pathsep.join([str(SDK_DIR), str(ROOT)])})
    # A row the SDK lost (a timeout on a loaded machine) is its outcome, not the bench's failure.
    run.check(allowed=(0, 1))
    print(f"the SDK's way: {run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ''}")
    return run, api_requests(stats_delta(before, sim.counts()))

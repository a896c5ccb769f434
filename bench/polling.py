"""Polls per row when generations take a steady 2-4 s.

The poller should learn how long generations take from the ones that
completed and poll most rows once, near their end. Each run is a (rate,
first-poll wait) pair: a wait shorter than the generations (a user's guess
that is too small: the learning has to fix it), the default wait, and the
hard case of a short wait with submissions so fast that every row is polled
before the first generation completes.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

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

__all__ = ["PollResult", "bench_polling"]


@dataclass(slots=True)
class PollResult:
    """One polling run."""

    rate: float
    poll_interval: float
    rows: int
    polls: int
    requests: dict[str, int]
    run: ChildRun
    duration: str = "2,4"
    # Per row: seconds from the generation's end to the row moving on, and
    # that as a share of the generation's duration.
    latencies: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)

    @property
    def per_row(self) -> float:
        return self.polls / self.rows

    @property
    def median_share(self) -> float:
        return statistics.median(self.shares) if self.shares else float("nan")


def noticed_after(sim: SimProcess, ledger: Path) -> tuple[list[float], list[float]]:
    """Per completed row: seconds from its generation's end to its ``complete`` event,
    and that as a share of the generation's duration (the simulator says when each
    generation ended; the ledger when the row moved on)."""
    with urllib.request.urlopen(f"{sim.origin}/_sim/generations", timeout=30) as resp:
        gens = {g["generationId"]: g for g in json.loads(resp.read())["generations"]}
    with closing(sqlite3.connect(ledger)) as conn:
        done = conn.execute(
            "SELECT r.generation_id, e.at FROM ledger_events e JOIN ledger_rows r "
            "ON r.row_id = e.row_id WHERE e.event = 'complete'").fetchall()
    lat: list[float] = []
    shares: list[float] = []
    for gen_id, at in done:
        g = gens.get(gen_id)
        if g is None:
            continue
        took = g["endsAt"] - g["createdAt"]
        lat.append(max(0.0, at - g["endsAt"]))
        shares.append(lat[-1] / took if took > 0 else 0.0)
    return lat, shares


def bench_polling(rows: int = 300, *,
                  configs: tuple[tuple[float, float], ...] = ((50.0, 1.0), (50.0, 5.0)),
                  duration: str = "2,4",
                  long: tuple[int, str, float, float] | None = None,
                  ) -> tuple[list[PollResult], list[Figure]]:
    """One run per (rate, first-poll wait), each on a fresh simulator; then, with
    ``long`` = (rows, duration, rate, first-poll wait), one run of long generations."""
    section(f"polling: {rows} rows, generations take {duration} s")
    runs = [(rows, duration, rate, interval) for rate, interval in configs]
    if long is not None:
        runs.append(long)
    results: list[PollResult] = []
    for rows, duration, rate, interval in runs:
        hi = float(duration.split(",")[1])
        with workdir() as d, SimProcess("--duration", duration, "--seed", "3") as sim:
            manifest = write_project_manifest(d / "poll.csv", rows, prefix="poll")
            run, delta = measured_batcher_run(sim, manifest, "--rate", f"{rate:g}",
                                              "--poll-interval", f"{interval:g}",
                                              timeout=600)
            lat, shares = noticed_after(sim, manifest.with_suffix(".ledger.sqlite"))
        polls = delta.get("get_generation_progress", 0)
        res = PollResult(rate, interval, rows, polls, delta, run, duration, lat, shares)
        results.append(res)
        # No run ends before its requests have passed the rate, nor before the
        # last submission plus the longest generation.
        paced = api_requests(delta) / rate
        floor = max(paced, rows / rate + hi)
        print(f"--rate {rate:g} --poll-interval {interval:g}: {polls} polls = "
              f"{res.per_row:.2f} per row; "
              f"wall {run.wall:.1f} s = {run.wall / floor:.2f}x the floor {floor:.1f} s "
              f"(max of requests/rate {paced:.1f} s and last submission + longest "
              f"generation {rows / rate + hi:.1f} s); CPU {1000 * run.cpu / rows:.2f} ms/row; "
              f"{delta}")
        if lat:
            print(f"  generation end -> row moved on: median {statistics.median(lat):.2f} s = "
                  f"{100 * res.median_share:.1f}% of the duration (p90 "
                  f"{100 * sorted(shares)[int(0.9 * (len(shares) - 1))]:.1f}%), {len(lat)} rows")
    figures: list[Figure] = []
    for r in results:
        label = f"{r.duration.replace(',', '-')} s, --rate {r.rate:g} --poll-interval " \
                f"{r.poll_interval:g}"
        figures.append(Figure(f"polls per row ({label})", f"{r.per_row:.2f}", "<= 1.5",
                              r.per_row <= 1.5,
                              f"{r.rows} rows; wall {r.run.wall:.1f} s; "
                              f"{sum(r.requests.values()) / r.rows:.2f} API requests per row"))
        figures.append(Figure(f"end -> noticed, median share of duration ({label})",
                              f"{100 * r.median_share:.1f}%", "<= 15%",
                              r.median_share <= 0.15))
    return results, figures

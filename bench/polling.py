"""Polls per row when generations take a steady 2-4 s.

The poller should learn how long generations take from the ones that
completed and poll most rows once, near their end. Each run is a (rate,
first-poll wait) pair: a wait shorter than the generations (a user's guess
that is too small: the learning has to fix it), the default wait, and the
hard case of a short wait with submissions so fast that every row is polled
before the first generation completes.
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

    @property
    def per_row(self) -> float:
        return self.polls / self.rows


def bench_polling(rows: int = 300, *,
                  configs: tuple[tuple[float, float], ...] = ((50.0, 1.0), (50.0, 5.0)),
                  duration: str = "2,4") -> tuple[list[PollResult], list[Figure]]:
    """One run per (rate, first-poll wait), each on a fresh simulator."""
    section(f"polling: {rows} rows, generations take {duration} s")
    results: list[PollResult] = []
    lo, hi = (float(x) for x in duration.split(","))
    for rate, interval in configs:
        with workdir() as d, SimProcess("--duration", duration, "--seed", "3") as sim:
            manifest = write_project_manifest(d / "poll.csv", rows, prefix="poll")
            run, delta = measured_batcher_run(sim, manifest, "--rate", f"{rate:g}",
                                              "--poll-interval", f"{interval:g}")
        polls = delta.get("get_generation_progress", 0)
        res = PollResult(rate, interval, rows, polls, delta, run)
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
    figures = [
        Figure(f"polls per row ({lo:g}-{hi:g} s, --rate {r.rate:g} "
               f"--poll-interval {r.poll_interval:g})",
               f"{r.per_row:.2f}", "<= 1.5", r.per_row <= 1.5,
               f"{r.rows} rows; wall {r.run.wall:.1f} s; "
               f"{sum(r.requests.values()) / r.rows:.2f} API requests per row")
        for r in results
    ]
    return results, figures

"""Requests per row and wall time with and without webhooks, side by side.

The same project rows (generations take a steady 2-4 s) at the same
``--rate``: once polling, once with ``--webhook-listen`` and every event
delivered, once with 30 % of events dropped (the rest duplicated and
reordered), where polls are the safety net. The figures are API requests
per row and wall ÷ (rows ÷ rate): 1.0 is a run that takes no longer than
its rows' submissions at the rate (a polling run spends part of the rate
on polls, so its rows go out later).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from batcher.webhooks import WebhookSecret

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

__all__ = ["HookResult", "bench_webhooks"]

_SECRET_ENV = "BENCH_WEBHOOK_SECRET"


@dataclass(slots=True)
class HookResult:
    """One run of the comparison."""

    name: str
    rows: int
    rate: float
    requests: dict[str, int]
    run: ChildRun

    @property
    def per_row(self) -> float:
        return api_requests(self.requests) / self.rows

    @property
    def wall_ratio(self) -> float:
        return self.run.wall / (self.rows / self.rate)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bench_webhooks(rows: int = 300, *, rate: float = 50.0, duration: str = "2,4",
                   poll_interval: float = 1.0) -> tuple[list[HookResult], list[Figure]]:
    """Three runs on fresh simulators: polling, webhooks, webhooks with 30 % dropped."""
    section(f"webhooks: {rows} rows at --rate {rate:g}, generations take {duration} s")
    os.environ.setdefault(_SECRET_ENV, WebhookSecret.generate().reveal())
    cases = (("polling", ()), ("webhooks", ()),
             ("webhooks, 30% dropped", ("--webhook-drop", "0.3", "--webhook-duplicate", "1",
                                        "--webhook-reorder", "1")))
    results: list[HookResult] = []
    for name, faults in cases:
        hooks = name != "polling"
        port = _free_port()
        sim_args = ["--duration", duration, "--seed", "3"]
        run_args = ["--rate", f"{rate:g}", "--poll-interval", f"{poll_interval:g}"]
        if hooks:
            sim_args += ["--webhook-url", f"http://127.0.0.1:{port}/",
                         "--webhook-secret-env", _SECRET_ENV, *faults]
            run_args += ["--webhook-listen", str(port), "--webhook-secret-env", _SECRET_ENV]
        with workdir() as d, SimProcess(*sim_args) as sim:
            manifest = write_project_manifest(d / "hooks.csv", rows, prefix="hook")
            run, delta = measured_batcher_run(sim, manifest, *run_args)
        res = HookResult(name, rows, rate, delta, run)
        results.append(res)
        print(f"{name}: {res.per_row:.2f} API requests per row, wall {run.wall:.1f} s = "
              f"{res.wall_ratio:.2f} x rows/rate ({rows / rate:.1f} s); {delta}", flush=True)
    print("side by side (requests per row | wall / (rows / rate)):")
    for res in results:
        print(f"  {res.name:<24} {res.per_row:5.2f} | {res.wall_ratio:5.2f}")
    figures = [
        Figure(f"API requests per row ({r.name}, --rate {rate:g})", f"{r.per_row:.2f}",
               "<= 1.1" if r.name == "webhooks" else "",
               (r.per_row <= 1.1) if r.name == "webhooks" else None,
               f"wall / (rows / rate) = {r.wall_ratio:.2f}; {r.rows} rows")
        for r in results
    ]
    return results, figures

"""Idle stays idle: CPU of a batcher process while all its generations run.

Generations all take 60 s, so after the submissions and the first polls the
run only waits. A sampler reads the batcher process's CPU time
(``/proc/PID/stat``, user + sys) and the simulator's request count once a
second; seconds in which the simulator saw no request at all are waiting
seconds, and the CPU spent in them is the cost of waiting: timers, redraws,
wake-ups of the ledger writer or a heartbeat. Printed per waiting minute and
as a share of one core.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from .common import (
    API_KEY,
    PYTHON,
    Figure,
    SimProcess,
    child_env,
    section,
    workdir,
    write_project_manifest,
)

__all__ = ["IdleResult", "bench_idle"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(slots=True)
class IdleResult:
    """CPU seconds spent over seconds of waiting (no request at the simulator)."""

    rows: int
    waiting: float
    cpu: float

    @property
    def core_share(self) -> float:
        return self.cpu / self.waiting if self.waiting else float("nan")


def _cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def bench_idle(rows: int = 50, *, duration: float = 60.0, rate: float = 50.0,
               poll_interval: float = 5.0) -> tuple[IdleResult, list[Figure]]:
    """One run of ``rows`` generations of ``duration`` s, sampled once a second."""
    section(f"idle: {rows} rows, generations take {duration:g} s, --rate {rate:g} "
            f"--poll-interval {poll_interval:g}; CPU while the simulator sees no request")
    with workdir() as d, SimProcess("--duration", f"{duration:g},{duration:g}") as sim:
        manifest = write_project_manifest(d / "idle.csv", rows, prefix="idle")
        argv = [PYTHON, "-m", "batcher", "run", str(manifest), "-q", "--rate", f"{rate:g}",
                "--poll-interval", f"{poll_interval:g}", "--api-base", sim.base_url]
        proc = subprocess.Popen(argv, env=child_env({"DIFFIO_API_KEY": API_KEY}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        waiting = cpu = 0.0
        last_cpu, last_requests = _cpu(proc.pid), sim.stats()["requests"]
        while proc.poll() is None:
            start = time.monotonic()
            time.sleep(1.0)
            now_cpu, now_requests = _cpu(proc.pid), sim.stats()["requests"]
            if now_cpu is None or last_cpu is None:
                break
            if now_requests == last_requests:
                waiting += time.monotonic() - start
                cpu += now_cpu - last_cpu
            last_cpu, last_requests = now_cpu, now_requests
        proc.wait()
    res = IdleResult(rows, waiting, cpu)
    print(f"waiting {waiting:.0f} s (seconds with no request at the simulator): CPU "
          f"{cpu:.3f} s = {60 * res.core_share:.3f} s per waiting minute = "
          f"{100 * res.core_share:.3f}% of one core")
    figure = Figure("CPU while waiting (60 s generations)",
                    f"{100 * res.core_share:.3f}% of a core "
                    f"({60 * res.core_share * 1000:.0f} ms per waiting minute)",
                    "< 0.2%", res.core_share < 0.002,
                    f"{rows} rows; {waiting:.0f} s of waiting sampled once a second "
                    f"(clock ticks of {1000 // _TICKS} ms)")
    return res, [figure]

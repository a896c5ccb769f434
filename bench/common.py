"""Shared plumbing: child processes with their resource usage, the simulator, manifests.

Every figure about "the batcher process" comes from ``os.wait4`` on that
child alone (user + sys CPU seconds, peak RSS), so the simulator's work, the
benchmark's own work and other children never leak into it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher.settings import DEFAULT_MODEL
from batcher.simulator.catalog import api_for_model

__all__ = [
    "API_KEY",
    "PYTHON",
    "STORAGE_ENDPOINTS",
    "ChildRun",
    "Figure",
    "SimProcess",
    "api_requests",
    "batcher_run",
    "child_env",
    "endpoint_counts",
    "measured_batcher_run",
    "run_child",
    "stats_delta",
    "write_project_manifest",
]

API_KEY = "sim-key"
# Signed-URL traffic the simulator counts beside the API; not rate-limited.
STORAGE_ENDPOINTS = frozenset({"upload", "download"})
PYTHON = sys.executable
# The folder holding ``bench/``: children run ``python -m bench.…`` from anywhere.
ROOT = Path(__file__).resolve().parent.parent


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with ``bench`` importable, plus ``extra``."""
    env = dict(os.environ)
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


@dataclass(slots=True)
class ChildRun:
    """What one child process cost: wall time, CPU and peak memory."""

    argv: list[str]
    returncode: int
    wall: float  # seconds from spawn to reaped
    user: float  # CPU seconds in user mode
    sys: float  # CPU seconds in the kernel on its behalf
    maxrss_mb: float  # peak resident set size
    stdout: str
    stderr: str
    spawned_at: float = 0.0  # time.time() just before the spawn, to line up with ledger stamps
    report: dict[str, Any] = field(default_factory=dict)  # batcher --report, when asked

    @property
    def cpu(self) -> float:
        """User + sys seconds."""
        return self.user + self.sys

    def check(self, allowed: Sequence[int] = (0,)) -> ChildRun:
        """Raise with the child's output when it exited with an unexpected code."""
        if self.returncode not in allowed:
            tail = (self.stdout[-2000:] + "\n" + self.stderr[-3000:]).strip()
            raise RuntimeError(
                f"{' '.join(self.argv[:6])} … exited {self.returncode}:\n{tail}"
            )
        return self


def run_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 1800.0,
) -> ChildRun:
    """Run ``argv`` to its end and measure it with ``os.wait4``.

    Output goes to temporary files, not pipes: a chatty child can never block
    on a full pipe while we wait for it.
    """
    full_env = child_env(env)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        spawned_at = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=full_env, cwd=cwd)
        # Blocking wait (no polling loop competing for the 2 cores); a timer
        # kills a child that hangs.
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - start
        # Popen must not try to reap the pid again (it is gone).
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(
            argv=list(argv),
            returncode=proc.returncode,
            wall=wall,
            user=usage.ru_utime,
            sys=usage.ru_stime,
            maxrss_mb=usage.ru_maxrss / 1024.0,  # KiB on Linux
            stdout=out.read(),
            stderr=err.read(),
            spawned_at=spawned_at,
        )


def batcher_run(
    manifest: Path,
    base_url: str | None,
    *extra: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800.0,
    python_args: Sequence[str] = (),
) -> ChildRun:
    """``python -m batcher run MANIFEST …`` as a measured child, with its JSON report."""
    report = manifest.with_suffix(".report.json")
    report.unlink(missing_ok=True)
    argv = [PYTHON, *python_args, "-m", "batcher", "run", str(manifest), "-q",
            "--report", str(report), *extra]
    if base_url is not None:
        argv += ["--api-base", base_url]
    child_env = {"DIFFIO_API_KEY": API_KEY, **(env or {})}
    run = run_child(argv, env=child_env, timeout=timeout)
    if report.exists():
        run.report = json.loads(report.read_text())
    return run


def measured_batcher_run(sim: SimProcess, manifest: Path, *extra: str,
                         timeout: float = 1800.0) -> tuple[ChildRun, dict[str, int]]:
    """A checked ``batcher_run`` against ``sim`` and the requests it made there, per endpoint."""
    before = sim.counts()
    run = batcher_run(manifest, sim.base_url, *extra, timeout=timeout).check()
    return run, stats_delta(before, sim.counts())


def write_project_manifest(path: Path, rows: int, *, prefix: str = "proj") -> Path:
    """A CSV of ``rows`` distinct ``apiProjectId`` rows (the simulator creates them)."""
    with path.open("w", encoding="utf-8") as f:
        f.write("apiProjectId,seed\n")
        chunk: list[str] = []
        for i in range(rows):
            chunk.append(f"{prefix}-{i:07d},{i % 1000}\n")
            if len(chunk) >= 10_000:
                f.writelines(chunk)
                chunk.clear()
        f.writelines(chunk)
    return path


def endpoint_counts(stats: Mapping[str, Any]) -> dict[str, int]:
    """Requests per endpoint name (all statuses) from a ``/_sim/stats`` answer."""
    by = stats.get("requests_by_endpoint", {})
    return {name: sum(int(n) for n in statuses.values()) for name, statuses in by.items()}


def api_requests(counts: Mapping[str, int]) -> int:
    """API requests only (signed storage URLs and the upload host left out)."""
    return sum(n for name, n in counts.items()
               if name not in STORAGE_ENDPOINTS and not name.startswith("edge:"))


def stats_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Per-endpoint requests made between two snapshots."""
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


class SimProcess:
    """``python -m batcher simulate`` in its own process, on a free port.

    It serves the API generation of batcher's default model unless ``api``
    names one (``"seed"`` for the seed-era SDK baseline).
    """

    def __init__(self, *args: str, api: str | None = None) -> None:
        self.args = args
        self.api = api or api_for_model(DEFAULT_MODEL)
        self.base_url = ""
        self.origin = ""
        self._proc: subprocess.Popen[str] | None = None
        self._err: Any = None

    def __enter__(self) -> SimProcess:
        argv = [PYTHON, "-m", "batcher", "simulate", "--port", "0", "--auto-create-projects",
                "--api", self.api, *self.args]
        self._err = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._err,
                                      text=True, env=child_env())
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        marker = "listening on "
        if marker not in line:
            self._proc.kill()
            self._proc.wait()
            self._err.seek(0)
            tail = self._err.read()[-1500:]
            self._err.close()
            raise RuntimeError(f"simulator did not start: {line!r} {tail}")
        self.base_url = line.split(marker, 1)[1].strip()
        self.origin = self.base_url.removesuffix("/v1")
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self._err.close()

    def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``."""
        with urllib.request.urlopen(f"{self.origin}/_sim/stats", timeout=30) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def counts(self) -> dict[str, int]:
        """Requests per endpoint so far."""
        return endpoint_counts(self.stats())


@contextmanager
def workdir(prefix: str = "batcher-bench-") -> Iterator[Path]:
    """A temporary folder for manifests and ledgers, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


@dataclass(slots=True)
class Figure:
    """One line of the summary table."""

    name: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: no target
    note: str = ""

    def verdict(self) -> str:
        return "" if self.ok is None else ("met" if self.ok else "NOT MET")


def print_table(figures: Sequence[Figure], stream: Any = None) -> None:
    """The closing summary, aligned plain text."""
    stream = stream or sys.stdout
    head = ("measure", "figure", "target", "verdict")
    rows = [(f.name, f.value, f.target, f.verdict()) for f in figures]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), file=stream)
    print(line, file=stream)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)), file=stream)
    notes = [f for f in figures if f.note]
    if notes:
        print(file=stream)
        for f in notes:
            print(f"- {f.name}: {f.note}", file=stream)


def section(title: str) -> None:
    """A heading for one benchmark's own lines."""
    print(f"\n== {title}", flush=True)

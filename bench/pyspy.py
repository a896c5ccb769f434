"""A sampled CPU profile of the rate run with py-spy (all threads, GIL holder only).

cProfile (``--profile``) sees the event-loop thread alone and counts wall
time; py-spy's ``--gil`` samples whichever thread holds the GIL, so the
ledger's writer thread and the worker threads are in it, and waiting is not.
py-spy is not a dependency (``pip install py-spy``)::

    python -m bench.pyspy bench/profiles/rate-after.txt [--rows 3000] [--rate 1000]

writes the raw samples beside the summary (``.raw``) and the summary: the
share of samples per function, as the leaf (own time) and anywhere on the
stack (inclusive).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

from .common import PYTHON, SimProcess, child_env, workdir, write_project_manifest

__all__ = ["main", "summarize"]

_LIBS = ("batcher", "aiohttp", "anyio", "asyncio", "sqlite3", "logging", "yarl", "multidict",
         "bench", "httpx", "httpcore")


def _short(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``."""
    m = re.match(r"(.*) \((.*?):?(\d*)\)$", frame)
    if not m:
        return frame
    fn, parts = m.group(1), m.group(2).split("/")
    for lib in _LIBS:
        if lib in parts:
            return f"{fn} ({'/'.join(parts[parts.index(lib):])})"
    return f"{fn} ({parts[-1]})"


def summarize(raw: Path, top: int = 60) -> str:
    """Own and inclusive shares of the samples in py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"samples {total} (the thread holding the GIL)", "", "-- own (leaf) share"]
    out += [f"{100 * n / total:6.2f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "-- inclusive share"]
    out += [f"{100 * n / total:6.2f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Record one rate run under py-spy and write its summary."""
    ap = argparse.ArgumentParser(prog="python -m bench.pyspy", description=__doc__)
    ap.add_argument("out", type=Path, help="summary file (.txt); the samples go beside it")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--top", type=int, default=60)
    args = ap.parse_args(argv)
    raw = args.out.with_suffix(".raw")
    with workdir() as d, SimProcess("--duration", "0,0") as sim:
        manifest = write_project_manifest(d / "spy.csv", args.rows, prefix="spy")
        command = ["python", "-m", "batcher", "run", "MANIFEST", "-q", "--rate", f"{args.rate:g}",
                   "--concurrency", "64", "--poll-interval", "0"]
        argv_ = ["py-spy", "record", "--gil", "-r", "1000", "-f", "raw", "-o", str(raw), "--",
                 PYTHON, *command[1:4], str(manifest), *command[5:], "--api-base", sim.base_url]
        subprocess.run(argv_, env=child_env({"DIFFIO_API_KEY": "sim-key"}), check=True,
                       capture_output=True)
    head = (f"# py-spy record --gil -r 1000 -f raw -- {' '.join(command)}\n"
            f"# {args.rows} rows, generations done at once (simulate --duration 0,0)\n")
    args.out.write_text(head + summarize(raw, args.top))
    print(f"wrote {args.out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

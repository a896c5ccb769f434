"""``python -m bench``: every benchmark in one command, then a summary.

The batcher and the simulator always run as separate processes; figures are
ratios and per-row costs measured on this machine (2 shared cores: expect a
few percent of noise between runs). ``--quick`` is a smoke run (< 1 min) with
small counts whose figures are not comparable with the targets.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import Figure, print_table, section

__all__ = ["Sizes", "main"]

BENCHES = ("rate", "polling", "idle", "memory", "ledger", "side", "uploads", "webhooks")


@dataclass(frozen=True, slots=True)
class Sizes:
    """Row counts and rates of one benchmark run."""

    rate_rows: int = 3000
    rate: float = 1000.0
    concurrency: int = 64
    poll_rows: int = 300
    # (--rate, --poll-interval) pairs
    poll_configs: tuple[tuple[float, float], ...] = ((50.0, 1.0), (50.0, 5.0), (200.0, 0.5))
    # (rows, durations, --rate, --poll-interval) of the long generations' run; 0 rows: none
    long_poll: tuple[int, str, float, float] = (200, "40,40", 50.0, 30.0)
    idle_rows: int = 50
    dry_rows: int = 1_000_000
    real_rows: int = 100_000
    real_rate: float = 2000.0
    ledger_rows: int = 20_000
    ledger_callers: tuple[int, ...] = (64, 256, 1024)
    side_rows: int = 300
    side_rate: float = 50.0
    # MiB per file of the large upload run (16 files at once)
    upload_mb: int = 128
    hook_rows: int = 300


QUICK = Sizes(rate_rows=500, poll_rows=60, poll_configs=((50.0, 1.0),),
              long_poll=(0, "40,40", 50.0, 30.0), idle_rows=10, dry_rows=20_000,
              real_rows=2_000, ledger_rows=2_000, ledger_callers=(256,), side_rows=32,
              upload_mb=32, hook_rows=60)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small counts, under a minute")
    ap.add_argument("--only", action="append", choices=BENCHES, metavar="NAME",
                    help=f"run only these (repeatable): {', '.join(BENCHES)}")
    ap.add_argument("--rate-rows", type=int, help="rows of the rate/CPU run [3000]")
    ap.add_argument("--real-rows", type=int,
                    help="rows of the real run measured for memory [100000]")
    ap.add_argument("--dry-rows", type=int, help="rows of the --dry-run measured for memory "
                    "[1000000]")
    ap.add_argument("--big", action="store_true",
                    help="also the big catalog: a real run of --big-rows rows (tens of minutes)")
    ap.add_argument("--big-rows", type=int, default=1_000_000, help="rows of --big [1000000]")
    ap.add_argument("--big-rate", type=float, default=1000.0, help="--rate of --big [1000]")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="also profile the rate run under cProfile into DIR")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and print the summary table."""
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    overrides = {k: v for k, v in (("rate_rows", args.rate_rows), ("real_rows", args.real_rows),
                                   ("dry_rows", args.dry_rows)) if v is not None}
    if overrides:
        sizes = Sizes(**{**asdict(sizes), **overrides})
    chosen = args.only or list(BENCHES)
    print(f"batcher benchmark ({'quick' if args.quick else 'full'}): python "
          f"{platform.python_version()}, {platform.machine()}, {_cpus()} CPUs; "
          f"sizes {asdict(sizes)}", flush=True)
    _compile_batcher()
    started = time.perf_counter()
    figures: list[Figure] = []
    failures: list[str] = []

    def run(name: str, fn: Callable[[], list[Figure]]) -> None:
        if name not in chosen:
            return
        t0 = time.perf_counter()
        try:
            figures.extend(fn())
        except Exception as exc:  # one broken benchmark must not hide the others
            failures.append(name)
            print(f"benchmark {name} failed: {exc}", file=sys.stderr, flush=True)
            figures.append(Figure(name, "failed", ok=False, note=str(exc).splitlines()[0]))
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)

    from . import idle, ledger, memory, polling, rate, side_by_side, uploads, webhooks

    small_cpu: list[float] = []

    def rate_run() -> list[Figure]:
        res, figs = rate.bench_rate(sizes.rate_rows, sizes.rate, sizes.concurrency)
        small_cpu.append(res.cpu_ms_per_row)
        return figs

    run("rate", rate_run)
    run("polling", lambda: polling.bench_polling(
        sizes.poll_rows, configs=sizes.poll_configs,
        long=sizes.long_poll if sizes.long_poll[0] else None)[1])
    run("idle", lambda: idle.bench_idle(sizes.idle_rows)[1])
    run("memory", lambda: memory.bench_memory(
        sizes.dry_rows, sizes.real_rows, rate=sizes.real_rate, concurrency=sizes.concurrency)[1])
    run("ledger", lambda: ledger.bench_ledger(sizes.ledger_rows, sizes.ledger_callers)[1])
    run("side", lambda: side_by_side.bench_side_by_side(sizes.side_rows, rate=sizes.side_rate)[1])
    run("uploads", lambda: uploads.bench_uploads(large_mb=sizes.upload_mb)[1])
    run("webhooks", lambda: webhooks.bench_webhooks(sizes.hook_rows)[1])
    if args.big:
        from . import big

        chosen.append("big")
        run("big", lambda: big.bench_big(args.big_rows, rate=args.big_rate,
                                         concurrency=sizes.concurrency,
                                         small_cpu_ms=small_cpu[0] if small_cpu else None)[1])
    if args.profile is not None:
        from .profile import profile_rate

        profile_rate(args.profile, sizes.rate_rows, sizes.rate, sizes.concurrency)

    section(f"summary ({time.perf_counter() - started:.0f} s)")
    print_table(figures)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2))
    return 1 if failures else 0


def _compile_batcher() -> None:
    """Byte-compile batcher as an installed wheel would be.

    An editable install under ``PYTHONDONTWRITEBYTECODE`` would otherwise
    compile every module from source in every child (some 70 ms of start-up).
    """
    import compileall

    import batcher

    compileall.compile_dir(Path(batcher.__file__).parent, quiet=1)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())

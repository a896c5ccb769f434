"""The way a user of the official SDK runs a catalog today (the baseline).

A thread pool of 16 threads; each row is ``generations.create_and_wait`` of
the real ``diffio`` SDK (0.1.92): one ``create_generation``, then
``get_generation_progress`` at once and every 2 s until the generation is
complete. No rate limit, no ledger. Run as its own process so its CPU and
memory are measured alone. SDK 0.1.92 speaks the seed-era API (diffio-3.5):
point it at ``batcher simulate --api seed``::

    python -m bench.sdk_baseline --base-url URL --manifest M.csv [--threads 16]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["main", "run_rows"]


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_rows(base_url: str, api_key: str, rows: list[dict[str, str]], *, threads: int,
             poll_interval: float, model: str) -> dict[str, Any]:
    """Submit and wait for every row with the SDK; count outcomes."""
    from diffio import DiffioClient  # the official SDK, httpx underneath

    outcomes = {"complete": 0, "failed": 0}
    errors: dict[str, int] = {}

    def one(row: dict[str, str]) -> str:
        project = row["apiProjectId"]
        seed = int(row["seed"]) if row.get("seed") else None
        try:
            client.generations.create_and_wait(
                apiProjectId=project,
                model=model,
                sampling={"seed": seed} if seed is not None else None,
                # A careful SDK user passes a key, so a retried create is free.
                idempotencyKey=f"sdk-{project}-{seed}",
                pollInterval=poll_interval,
            )
        except Exception as exc:  # the baseline counts failures, it does not retry
            return type(exc).__name__
        return "complete"

    start = time.perf_counter()
    with DiffioClient(apiKey=api_key, baseUrl=base_url) as client, \
            ThreadPoolExecutor(max_workers=threads) as pool:
        for outcome in pool.map(one, rows):
            if outcome == "complete":
                outcomes["complete"] += 1
            else:
                outcomes["failed"] += 1
                errors[outcome] = errors.get(outcome, 0) + 1
    return {"rows": len(rows), **outcomes, "errors": errors,
            "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    """Command line of the baseline child; prints one JSON object."""
    ap = argparse.ArgumentParser(prog="python -m bench.sdk_baseline", description=__doc__)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--api-key", default="sim-key")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--poll-interval", type=float, default=2.0)
    ap.add_argument("--model", default="diffio-3.5")
    args = ap.parse_args(argv)
    result = run_rows(args.base_url, args.api_key, _rows(args.manifest), threads=args.threads,
                      poll_interval=args.poll_interval, model=args.model)
    print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

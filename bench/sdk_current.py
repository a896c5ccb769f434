"""The SDK's own way on today's API (the CPU baseline of the rate benchmark).

The official ``diffio`` SDK 0.3.10, as its documentation runs a batch: a
thread pool (64 threads), each row ``create_generation`` with an
idempotency key, then ``wait_for_generation`` (httpx underneath). No rate
limit, no ledger. SDK 0.3.10 cannot share an environment with the 0.1.92 the
test extra installs, so it lives in its own folder (``.diffio-0.3.10`` at the
repository's root, ``pip install --target .diffio-0.3.10 diffio==0.3.10``),
put first on this child's ``PYTHONPATH``::

    PYTHONPATH=.diffio-0.3.10 python -m bench.sdk_current --base-url URL --manifest M.csv
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

__all__ = ["SDK_DIR", "main"]

# Where the benchmark expects SDK 0.3.10 (see the module docstring).
SDK_DIR = Path(__file__).resolve().parent.parent / ".diffio-0.3.10"


def main(argv: list[str] | None = None) -> int:
    """Command line of the baseline child; prints one JSON object."""
    ap = argparse.ArgumentParser(prog="python -m bench.sdk_current", description=__doc__)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--api-key", default="sim-key")
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--poll-interval", type=float, default=2.0)
    args = ap.parse_args(argv)
    from diffio import DiffioClient  # SDK 0.3.10, from SDK_DIR on PYTHONPATH

    with args.manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    failed: dict[str, int] = {}

    def one(row: dict[str, str]) -> str:
        project = row["apiProjectId"]
        try:
            gen = client.create_generation(apiProjectId=project,
                                           sampling={"seed": int(row["seed"])},
                                           idempotencyKey=f"sdk-{project}")
            client.wait_for_generation(generationId=gen.generationId, apiProjectId=project,
                                       pollInterval=args.poll_interval, timeout=3600)
        except Exception as exc:  # the baseline counts failures, it does not retry
            return type(exc).__name__
        return "complete"

    start = time.perf_counter()
    done = 0
    with DiffioClient(apiKey=args.api_key, baseUrl=args.base_url) as client, \
            ThreadPoolExecutor(max_workers=args.threads) as pool:
        for outcome in pool.map(one, rows):
            if outcome == "complete":
                done += 1
            else:
                failed[outcome] = failed.get(outcome, 0) + 1
    result: dict[str, Any] = {"rows": len(rows), "complete": done, "failed": failed,
                              "seconds": round(time.perf_counter() - start, 3)}
    print(json.dumps(result))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

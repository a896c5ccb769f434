"""Several hosts, one job: three `batcher run` processes share a PostgreSQL ledger.

One of them is SIGKILLed mid-run; its leased rows are taken over by the
others after its leases expire. The simulator counts zero extra charges, and
the largest 1 s window it saw from the (one) API key stays within the job's
global --rate, split among the live workers.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import batcher_env, run_batcher, wait_for

PG = os.environ.get("BATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable() -> bool:
    import anyio
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG, timeout=5)
        await conn.close()

    try:
        anyio.run(probe, backend="asyncio")
    except Exception:
        return False
    return True


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _reachable(), reason=f"no PostgreSQL at {PG}")]


@pytest.fixture
def pg_url() -> Iterator[str]:
    schema = f"mh_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in PG else "?"
    yield f"{PG}{sep}schema={schema}"
    subprocess.run(["psql", PG.split("?")[0], "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"],
                   capture_output=True, check=False)


def _manifest(path: Path, n: int) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["apiProjectId", "prompt"])
        for i in range(n):
            writer.writerow([f"proj-{i:04d}", "clean"])
    return path


def _export(ledger: str) -> list[dict[str, Any]]:
    import json

    done = run_batcher("export", ledger)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_three_hosts_one_killed_every_row_once_within_the_global_rate(
        tmp_path: Path, simulator: Any, pg_url: str) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,2", "--latency", "0.002,0.01")
    manifest = _manifest(tmp_path / "m.csv", 150)
    rate = 30
    args = [sys.executable, "-m", "batcher", "run", str(manifest), "--api-base", sim.base_url,
            "--ledger", pg_url, "--rate", str(rate), "--poll-interval", "0.5",
            "--lease-ttl", "4"]
    procs = [subprocess.Popen(args, env=batcher_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        wait_for(lambda: sim.stats()["generations_created"] >= 40, timeout=30, interval=0.1)
        assert sim.stats()["generations_created"] >= 40
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        # The status and export of the shared job work from anywhere mid-run.
        mid = run_batcher("status", pg_url, "--json")
        assert mid.returncode == 0, mid.stderr
        outs = [p.communicate(timeout=120) for p in procs[1:]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs[1:], outs, strict=True):
        assert p.returncode == 0, out + err
    records = _export(pg_url)
    assert len(records) == 150 and {r["status"] for r in records} == {"complete"}
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert stats["generations_created"] == 150
    # The killed host held leases; the others took its rows over.
    schema = pg_url.rsplit("schema=", 1)[1]
    taken = subprocess.run(
        ["psql", PG.split("?")[0], "-Atc",
         f"SELECT count(*) FROM {schema}.ledger_events WHERE event = 'leaseTakenOver'"],
        capture_output=True, text=True, check=True)
    assert int(taken.stdout.strip()) >= 1
    # The job's --rate is a budget for all hosts together.
    assert stats["max_requests_per_second_by_key"]["sim-key"] <= rate

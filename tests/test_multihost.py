"""Several hosts, one job: three `batcher run` processes share a PostgreSQL ledger.

One of them is SIGKILLed mid-run; its leased rows are taken over by the
others after its leases expire. The simulator counts zero extra charges, and
the largest 1 s window it saw from the (one) API key stays within the job's
global --rate, split among the live workers.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    export_records,
    lease_takeovers,
    plain_project_manifest,
    run_batcher,
    start_hosts,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_three_hosts_one_killed_every_row_once_within_the_global_rate(
        tmp_path: Path, simulator: Any, pg_url: str) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,2", "--latency", "0.002,0.01")
    manifest = plain_project_manifest(tmp_path / "m.csv", 150)
    rate = 30
    args = ["run", str(manifest), "--api-base", sim.base_url, "--ledger", pg_url,
            "--rate", str(rate), "--poll-interval", "0.5", "--lease-ttl", "4"]
    procs = start_hosts(args, 3)
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
    records = export_records(pg_url)
    assert len(records) == 150 and {r["status"] for r in records} == {"complete"}
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert stats["generations_created"] == 150
    # The killed host held leases; the others took its rows over.
    assert lease_takeovers(pg_url) >= 1
    # The job's --rate is a budget for all hosts together.
    assert stats["max_requests_per_second_by_key"]["sim-key"] <= rate

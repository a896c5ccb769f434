"""Several hosts on one PostgreSQL ledger, as they really run: real ``batcher run``
processes against one simulator process.

* The job's ``--rate`` is one budget for all hosts together, also when there
  are more hosts than requests per second: the simulator's exact sliding
  window over all API requests of the key never holds more than ``--rate``.
* A host paused (SIGSTOP) longer than ``--lease-ttl`` has its rows taken over;
  woken (SIGCONT), it lets them go and ends 0 or 1, never 2, and nothing is
  charged twice.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    batcher_env,
    export_records,
    lease_takeovers,
    plain_project_manifest,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def start_host(manifest: Path, base_url: str, ledger: str, *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "batcher", "run", str(manifest), "--api-base", base_url,
            "--ledger", ledger, *extra]
    return subprocess.Popen(args, env=batcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str]]:
    """Wait for every host; (exit code, its output) each. Kills stragglers."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out + err) for p, (out, err) in zip(procs, outs, strict=True)]


@pytest.mark.parametrize(("hosts", "rate"), [(2, 1), (3, 1), (3, 2)])
def test_hosts_together_never_pass_the_rate(tmp_path: Path, simulator: Any, pg_url: str,
                                            hosts: int, rate: int) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.5,1.5")
    rows = 4 * rate + 2
    manifest = plain_project_manifest(tmp_path / "m.csv", rows)
    # One request at a time per host: each leases only a couple of rows, so
    # every host has work and sends (with more, the first would lease them all).
    procs = [start_host(manifest, sim.base_url, pg_url, "--rate", str(rate),
                        "--poll-interval", "0.5", "--concurrency", "1")
             for _ in range(hosts)]
    ends = finish(procs, timeout=240)
    for code, out in ends:
        assert code == 0, out
    records = export_records(pg_url)
    assert len(records) == rows and {r["status"] for r in records} == {"complete"}
    stats = sim.stats()
    assert (stats["generations_created"], stats["extra_charges"]) == (rows, 0)
    # Creates and polls of every host, in any 1 s window the server saw.
    assert stats["max_requests_per_second_by_key"]["sim-key"] <= rate, stats
    assert stats["requests"] >= 2 * rows  # a create and at least one poll each


def test_a_host_paused_past_its_lease_lets_its_rows_go_when_it_wakes(
        tmp_path: Path, simulator: Any, pg_url: str) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,2")
    rows = 40
    manifest = plain_project_manifest(tmp_path / "m.csv", rows)
    ttl = 3.0
    args = ("--rate", "4", "--poll-interval", "0.5", "--lease-ttl", str(ttl),
            "--concurrency", "8")
    paused = start_host(manifest, sim.base_url, pg_url, *args)
    other: subprocess.Popen[str] | None = None
    try:
        # Paused mid-job: with rows leased, some posted, more waiting for the gate.
        wait_for(lambda: sim.stats()["generations_created"] >= 4, timeout=60, interval=0.05)
        paused.send_signal(signal.SIGSTOP)
        stopped_at = sim.stats()["generations_created"]
        assert stopped_at < rows
        other = start_host(manifest, sim.base_url, pg_url, *args)
        # The other host takes the paused host's rows over once their leases
        # ran out by the database's clock, and posts them again (replays).
        wait_for(lambda: sim.stats()["generations_created"] >= rows, timeout=120, interval=0.1)
        time.sleep(ttl)  # well past the paused host's leases
    finally:
        paused.send_signal(signal.SIGCONT)
    assert other is not None
    ends = finish([paused, other], timeout=180)
    for code, out in ends:
        assert code in (0, 1), out
        assert "TransitionConflict" not in out and "Traceback" not in out, out
    assert ends[1][0] == 0, ends[1][1]
    records = export_records(pg_url)
    assert len(records) == rows and {r["status"] for r in records} == {"complete"}
    stats = sim.stats()
    assert (stats["generations_created"], stats["extra_charges"]) == (rows, 0), stats
    assert lease_takeovers(pg_url) >= 1

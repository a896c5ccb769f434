"""Operator experience, part 2: what a run may spend and when it stops.

The spend cap, --halt-after, --retry-failed (with a SIGKILL in the middle) and
the stale-lock takeover, each through real ``batcher run`` processes against a
real simulator process whose counters say what was charged.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import batcher_env, count_statuses, export_records, run_args, run_batcher, wait_for


def _manifest(path: Path, first: int, count: int) -> Path:
    """apiProjectId rows proj-FIRST .. proj-(FIRST+COUNT-1); distinct requests."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["apiProjectId", "prompt"])
        for i in range(first, first + count):
            writer.writerow([f"proj-{i:03d}", f"clean {i}"])
    return path


# ------------------------------------------------------------------ spend cap


def test_spend_cap_stops_resumes_and_covers_the_whole_job(tmp_path: Path, simulator: Any
                                                          ) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    manifest = _manifest(tmp_path / "m.csv", 0, 8)
    ledger = manifest.with_suffix(".sqlite")
    # apiProjectId rows have no readable audio: each is estimated at the 60 s
    # minimum, so $1 at $1 per minute.
    capped = run_args(manifest, sim.base_url, "--poll-interval", "0.1", "--price-per-minute", "1")

    first = run_batcher(*capped, "--max-spend", "3")
    assert first.returncode == 3, first.stdout + first.stderr
    assert "--max-spend" in first.stdout
    assert sim.stats()["generations_created"] == 3
    counts = count_statuses(export_records(ledger))
    assert counts == {"complete": 3, "pending": 5}  # what was in flight finished

    # Resumable with a higher cap: only the rest is posted.
    second = run_batcher(*capped, "--max-spend", "100")
    assert second.returncode == 0, second.stdout + second.stderr
    assert count_statuses(export_records(ledger)) == {"complete": 8}
    stats = sim.stats()
    assert stats["charges"] == 8 and stats["extra_charges"] == 0

    # The cap is the job's, counted from the ledger: 8 already spent, so a cap
    # of 10 leaves room for 2 of the 4 new rows, not for 4.
    _manifest(manifest, 0, 12)
    third = run_batcher(*capped, "--max-spend", "10")
    assert third.returncode == 3, third.stdout + third.stderr
    assert sim.stats()["charges"] == 10
    assert count_statuses(export_records(ledger)) == {"complete": 10, "pending": 2}
    # And the same cap again spends nothing more.
    again = run_batcher(*capped, "--max-spend", "10")
    assert again.returncode == 3
    assert sim.stats()["charges"] == 10


def test_spend_cap_counts_the_job_file_and_env(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    manifest = _manifest(tmp_path / "m.csv", 0, 5)
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nmanifest = "m.csv"\nledger = "m.sqlite"\napi_base = '
                   f'"{sim.base_url}"\npoll_interval = 0.1\nprice_per_minute = 1\n'
                   "max_spend = 100\n")
    # The environment's lower cap beats the job file's.
    done = run_batcher("run", str(job), env=batcher_env(BATCHER_MAX_SPEND="2"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert sim.stats()["charges"] == 2
    counts = count_statuses(export_records(manifest.with_suffix(".sqlite")))
    assert counts == {"complete": 2, "pending": 3}


# ------------------------------------------------------------------ --halt-after


def test_halt_after_stops_a_failing_run_early(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--failure-rate", "1", "--duration", "0,0.05")
    manifest = _manifest(tmp_path / "m.csv", 0, 40)
    done = run_batcher(*run_args(manifest, sim.base_url, "--halt-after", "50", "--rate", "20",
                                 "--concurrency", "2", "--poll-interval", "0.05"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "--halt-after 50" in done.stdout
    created = sim.stats()["generations_created"]
    assert 20 <= created < 34, created  # judged after 20 finished rows
    counts = count_statuses(export_records(manifest.with_suffix(".sqlite")))
    assert counts["pending"] == 40 - created
    assert counts["failed"] >= 20


# ------------------------------------------------------------------ --retry-failed


def _all_failed_at_the_api(tmp_path: Path, sim: Any, n: int) -> tuple[Path, list[str]]:
    manifest = _manifest(tmp_path / "m.csv", 0, n)
    first = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1", "--rate", "50"))
    assert first.returncode == 1, first.stdout + first.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert {(r["status"], r["apiStatus"]) for r in records} == {("failed", "failed")}
    assert {r["error"]["code"] for r in records} == {"generationFailed"}
    assert sim.stats()["charges"] == n
    sim.configure({"failure_rate": 0})
    return manifest, [r["idempotencyKey"] for r in sorted(records, key=lambda r: r["line"])]


def test_retry_failed_pays_once_more_under_a_new_key(tmp_path: Path, simulator: Any) -> None:
    n = 5
    sim = simulator("--auto-create-projects", "--failure-rate", "1", "--duration", "0.1,0.2")
    manifest, old_keys = _all_failed_at_the_api(tmp_path, sim, n)
    ledger = manifest.with_suffix(".sqlite")
    args = run_args(manifest, sim.base_url, "--poll-interval", "0.1", "--rate", "50")

    # Without --retry-failed a failed row stays failed, and nothing is paid.
    plain = run_batcher(*args)
    assert plain.returncode == 1
    assert count_statuses(export_records(ledger)) == {"failed": n}
    assert sim.stats()["charges"] == n

    retried = run_batcher(*args, "--retry-failed")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    records = sorted(export_records(ledger), key=lambda r: r["line"])
    assert {(r["status"], r["apiStatus"], r["retryCount"]) for r in records} == {
        ("complete", "complete", 1)}
    new_keys = [r["idempotencyKey"] for r in records]
    assert all(new != old for new, old in zip(new_keys, old_keys, strict=True))
    assert len(set(new_keys)) == n
    stats = sim.stats()
    assert stats["charges"] == 2 * n
    assert stats["retry_charges"] == n and stats["extra_charges"] == 0

    # Done is done: another --retry-failed run pays nothing.
    assert run_batcher(*args, "--retry-failed").returncode == 0
    assert sim.stats()["charges"] == 2 * n


def test_retry_failed_killed_mid_flight_still_pays_once(tmp_path: Path, simulator: Any
                                                        ) -> None:
    n = 6
    sim = simulator("--auto-create-projects", "--failure-rate", "1", "--duration", "0.1,0.2")
    manifest, old_keys = _all_failed_at_the_api(tmp_path, sim, n)
    ledger = manifest.with_suffix(".sqlite")
    # Slow generations, so the kill lands while the retried ones are running.
    sim.configure({"duration": [3, 3]})
    args = run_args(manifest, sim.base_url, "--poll-interval", "0.2", "--rate", "50",
                    "--retry-failed")
    proc = subprocess.Popen([sys.executable, "-m", "batcher", *args], env=batcher_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sim.stats()["charges"] >= 2 * n)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert sim.stats()["retry_charges"] == n

    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(ledger)
    assert {(r["status"], r["retryCount"]) for r in records} == {("complete", 1)}
    assert not set(old_keys) & {r["idempotencyKey"] for r in records}
    stats = sim.stats()
    assert stats["charges"] == 2 * n  # one new charge per row, not two
    assert stats["retry_charges"] == n and stats["extra_charges"] == 0


# ------------------------------------------------------------------ the lock


def test_a_sigkilled_runs_lock_is_taken_over(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "2,2")
    manifest = _manifest(tmp_path / "m.csv", 0, 4)
    ledger = manifest.with_suffix(".sqlite")
    args = run_args(manifest, sim.base_url, "--poll-interval", "0.3")
    proc = subprocess.Popen([sys.executable, "-m", "batcher", *args], env=batcher_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sim.stats()["generations_created"] >= 4)
        # Still running: a second run is refused, naming the holder.
        second = run_batcher(*args, timeout=30)
        assert second.returncode == 4, second.stdout + second.stderr
        assert f"pid {proc.pid}" in second.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert Path(f"{ledger}.lock").exists()  # the dead run's lock file is left behind

    start = time.monotonic()
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - start < 15
    assert count_statuses(export_records(ledger)) == {"complete": 4}
    stats = sim.stats()
    assert stats["generations_created"] == 4 and stats["extra_charges"] == 0


def test_retry_failed_reposts_a_transport_failure_with_its_own_key(tmp_path: Path,
                                                                   simulator: Any) -> None:
    n = 4
    sim = simulator("--auto-create-projects", "--error-rate", "1", "--duration", "0.1,0.2")
    manifest = _manifest(tmp_path / "m.csv", 0, n)
    ledger = manifest.with_suffix(".sqlite")
    args = run_args(manifest, sim.base_url, "--poll-interval", "0.1", "--max-attempts", "1")
    first = run_batcher(*args)
    assert first.returncode == 1, first.stdout + first.stderr
    failed = {r["rowId"]: r for r in export_records(ledger)}
    assert {r["error"]["httpStatus"] for r in failed.values()} == {500}
    assert sim.stats()["charges"] == 0
    sim.configure({"error_rate": 0})
    done = run_batcher(*args, "--retry-failed")
    assert done.returncode == 0, done.stdout + done.stderr
    for rec in export_records(ledger):
        assert rec["status"] == "complete" and rec["retryCount"] == 0
        # A 5xx may have hidden an accepted post: the same key, so a replay.
        assert rec["idempotencyKey"] == failed[rec["rowId"]]["idempotencyKey"]
    stats = sim.stats()
    assert stats["charges"] == n and stats["retry_charges"] == 0


def test_spend_cap_holds_when_answers_are_lost(tmp_path: Path, simulator: Any) -> None:
    # A lost answer: the API created and charged the generation, then the
    # connection was cut; the retry gets the same generation as a replay.
    sim = simulator("--auto-create-projects", "--lost-rate", "0.4", "--seed", "3",
                    "--duration", "0.1,0.2")
    manifest = _manifest(tmp_path / "m.csv", 0, 10)
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1",
                                 "--concurrency", "1", "--max-attempts", "10",
                                 "--price-per-minute", "1", "--max-spend", "3",
                                 "--report", str(tmp_path / "r.json")))
    assert done.returncode == 3, done.stdout + done.stderr
    stats = sim.stats()
    assert stats["lost_responses"] > 0
    assert stats["generations_created"] <= 3, stats["generations_created"]


def test_spend_cap_halt_message_reads_right(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.5,0.5")
    manifest = _manifest(tmp_path / "m.csv", 0, 4)
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1",
                                 "--price-per-minute", "1", "--max-spend", "2"))
    assert done.returncode == 3
    halted = [line for line in done.stdout.splitlines() if line.startswith("halted")]
    assert len(halted) == 1
    assert ".." not in halted[0] and "Fix it" not in halted[0]
    # Both $1 reservations were out when the third row was refused.
    assert "$2.00 of cap $2.00" in halted[0]

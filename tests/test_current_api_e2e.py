"""Today's Diffio API end to end: real `batcher` processes, a real simulator process.

Files go up in parts (small parts, so a small file is many of them), runs are
SIGKILLed in the middle of their uploads, and the simulator's own counters
say what was paid, confirmed, sent again and seen at the upload host.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    batcher_env,
    count_statuses,
    export_records,
    kill_repeatedly,
    run_args,
    run_batcher,
    wait_for,
    write_wav,
)

from batcher.simulator import restored_audio
from batcher.version import USER_AGENT

pytestmark = pytest.mark.slow

KIB = 1024


def noise_files(folder: Path, sizes: list[int]) -> tuple[Path, list[Path]]:
    """Files of seeded random bytes (different each) and a manifest of them."""
    files = []
    for i, size in enumerate(sizes):
        path = folder / "audio" / f"take{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random.Random(i).randbytes(size))
        files.append(path)
    manifest = folder / "m.csv"
    manifest.write_text("file,prompt\n" + "".join(
        f"{p.relative_to(folder)},clean\n" for p in files))
    return manifest, files


def uploads_in_flight(ledger: Path) -> int:
    """Rows whose upload has started and is not confirmed yet."""
    with sqlite3.connect(ledger) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM ledger_rows WHERE stage = 'project' "
                            "AND upload_id IS NOT NULL").fetchone()
    return int(n)


def test_a_file_job_killed_during_its_uploads_pays_once_and_confirms_every_upload(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.3,0.8", "--part-size", "64K", "--part-latency", "0.04,0.08",
                    "--seed", "21")
    sizes = [random.Random(100 + i).randint(600 * KIB, 1000 * KIB) for i in range(16)]
    manifest, files = noise_files(tmp_path, sizes)
    ledger = manifest.with_suffix(".sqlite")
    args = run_args(manifest, sim.base_url, "--rate", "30", "--poll-interval", "0.2",
                    "--concurrency", "6")
    in_flight: list[int] = []
    at_kills: list[dict[str, Any]] = []
    for _ in kill_repeatedly(args, seed=4, kills=6, window=(0.7, 1.4)):
        at_kills.append(sim.stats())
        in_flight.append(uploads_in_flight(ledger) if ledger.exists() else 0)
    assert len(at_kills) >= 4, [s["parts_received"] for s in at_kills]
    # Kills landed while files were still going up.
    assert any(n > 0 for n in in_flight), in_flight
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(ledger)
    assert count_statuses(records) == {"complete": len(files)}
    for path, rec in zip(files, records, strict=True):
        assert Path(rec["output"]).read_bytes() == restored_audio(path.read_bytes()), path
    stats = sim.stats()
    # Paid once per file, by this one key; every upload confirmed before its generation.
    assert (stats["charges"], stats["extra_charges"]) == (len(files), 0)
    assert stats["charges_by_key"] == {"sim-key": len(files)}
    assert set(stats["charges_by_request"].values()) == {1}
    assert stats["projects_confirmed"] == len(files)
    assert stats["generations_upload_missing"] == stats["generations_without_upload"] == 0
    # A kill costs at most the part each upload had on the wire.
    assert stats["parts_resent"] <= sum(in_flight), (stats["parts_resent"], in_flight)
    assert stats["parts_received"] - stats["parts_resent"] >= sum(
        -(-size // (64 * KIB)) for size in sizes)
    # The upload host never saw the API key; every request named batcher.
    assert stats["api_keys_at_upload_host"] == stats["signed_url_requests_with_key"] == 0
    assert set(stats["user_agents"]) == {USER_AGENT}


def test_a_large_upload_killed_midway_resumes_from_the_next_part(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.2,0.4", "--part-size", "256K", "--part-latency",
                    "0.03,0.05")
    manifest, (big,) = noise_files(tmp_path, [8 * 1024 * KIB])  # 32 parts
    ledger = manifest.with_suffix(".sqlite")
    args = run_args(manifest, sim.base_url, "--poll-interval", "0.2")
    proc = subprocess.Popen([sys.executable, "-m", "batcher", *args], env=batcher_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sim.stats()["parts_received"] >= 12, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with sqlite3.connect(ledger) as conn:
        (kept,) = conn.execute("SELECT COUNT(*) FROM ledger_upload_parts").fetchone()
    before = sim.stats()
    assert 10 <= kept < 32 and before["uploads_started"] == 1
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    after = sim.stats()
    # The same upload went on from the part after the last one the ledger kept:
    # at most the part on the wire at the kill is sent again.
    assert after["uploads_started"] == 1 and after["projects_created"] == 1
    sent_again = after["parts_received"] - before["parts_received"]
    assert 32 - kept <= sent_again <= 32 - kept + 1
    assert after["parts_resent"] <= 1
    assert (after["charges"], after["projects_confirmed"]) == (1, 1)
    (rec,) = export_records(ledger)
    assert Path(rec["output"]).read_bytes() == restored_audio(big.read_bytes())
    with sqlite3.connect(ledger) as conn:  # confirmed: the part records are gone
        assert conn.execute("SELECT COUNT(*) FROM ledger_upload_parts").fetchone() == (0,)


def test_a_retired_model_exits_3_within_seconds_naming_the_supported_models(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.2,0.4")
    manifest = tmp_path / "m.csv"
    manifest.write_text("apiProjectId\n" + "".join(f"p-{i}\n" for i in range(20)))
    start = time.monotonic()
    done = run_batcher(*run_args(manifest, sim.base_url, "--model", "diffio-3.5"))
    took = time.monotonic() - start
    assert done.returncode == 3, done.stdout + done.stderr
    assert took < 15, took
    halted = [line for line in done.stdout.splitlines() if line.startswith("halted:")]
    assert len(halted) == 1, done.stdout
    assert "diffio-3.5" in halted[0] and "diffio-4.6-flash, diffio-4.6-pro" in halted[0]
    assert "Traceback" not in done.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert count_statuses(records) == {"pending": 20}
    stats = sim.stats()
    assert stats["charges"] == 0 and stats["retired_model_refusals"] >= 1
    # The same rows with the served model go on, and pay once each.
    again = run_batcher(*run_args(manifest, sim.base_url))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (sim.stats()["charges"], sim.stats()["extra_charges"]) == (20, 0)


def test_the_bandwidth_cap_holds_over_real_time(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2", "--part-size", "128K")
    manifest, _ = noise_files(tmp_path, [512 * KIB, 512 * KIB])
    cap = 512 * KIB
    plan = run_batcher(*run_args(manifest, sim.base_url, "--max-bandwidth", "512K",
                                 "--dry-run"))
    assert plan.returncode == 0, plan.stderr
    assert "bytes to upload" in plan.stdout and "upload time at 512.0 KiB/s" in plan.stdout
    start = time.monotonic()
    done = run_batcher(*run_args(manifest, sim.base_url, "--max-bandwidth", "512K",
                                 "--poll-interval", "0.2"))
    took = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    # 1 MiB up and 1 MiB of restored audio down, under one cap of 512 KiB/s:
    # at least 4 s, less the quarter second a fresh budget may hold.
    moved = 2 * 1024 * KIB
    assert took >= (moved - cap * 0.25) / cap, took
    assert sim.stats()["charges"] == 2


def test_the_readme_demo_runs_on_todays_api(tmp_path: Path) -> None:
    write_wav(tmp_path / "a" / "take.wav", seconds=0.3)
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\na/take.wav\n")
    done = run_batcher("run", str(manifest), "--simulate", "--poll-interval", "0.2",
                       env=batcher_env(""))
    assert done.returncode == 0, done.stdout + done.stderr
    (rec,) = export_records(tmp_path / "m.ledger.sqlite")
    assert rec["modelKey"] == "diffio-4.6-flash" and rec["status"] == "complete"

"""File rows end to end: project, upload, generate, download.

Real `batcher run` processes against a real simulator process. Outputs are
checked against the simulator's deterministic restoration of each input, so
a mix-up between rows cannot pass.
"""

from __future__ import annotations

import csv
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import export_records, run_batcher, write_wav

from batcher.simulator import restored_audio

# Every test here runs real `batcher` processes.
pytestmark = pytest.mark.slow


def file_manifest(folder: Path, files: list[tuple[str, float]],
                  outputs: dict[str, str] | None = None) -> Path:
    manifest = folder / "m.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "prompt", "output"])
        for rel, freq in files:
            write_wav(folder / rel, seconds=0.2, freq=freq)
            writer.writerow([rel, "clean", (outputs or {}).get(rel, "")])
    return manifest


def args_for(manifest: Path, sim: Any, *extra: str) -> list[str]:
    return ["run", str(manifest), "--api-base", sim.base_url, "--poll-interval", "0.2",
            "--rate", "50", *extra]


NESTED = [("a/one.wav", 300.0), ("a/b/two.wav", 310.0), ("a/b/c/three.wav", 320.0),
          ("four.wav", 330.0), ("x/five.wav", 340.0), ("x/y/six.wav", 350.0)]


def test_nested_files_restored_into_mirrored_folders(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.4")
    manifest = file_manifest(tmp_path, NESTED)
    done = run_batcher(*args_for(manifest, sim))
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "m.out"
    records = export_records(tmp_path / "m.ledger.sqlite")
    assert len(records) == len(NESTED)
    for (rel, _), rec in zip(NESTED, records, strict=True):
        expected = out / (rel + ".restored.mp3")
        assert rec["status"] == "complete" and rec["output"] == str(expected)
        data = expected.read_bytes()
        assert data == restored_audio((tmp_path / rel).read_bytes())
        assert rec["outputSha256"] == hashlib.sha256(data).hexdigest()
    # No temp files left behind.
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
    stats = sim.stats()
    assert stats["generations_created"] == 6 and stats["extra_charges"] == 0
    assert stats["generations_without_upload"] == 0
    assert stats["signed_url_requests_with_key"] == 0

    # Resume: a deleted and a corrupted output are downloaded again, not generated.
    (out / "four.wav.restored.mp3").unlink()
    (out / "a/one.wav.restored.mp3").write_bytes(b"corrupt")
    again = run_batcher(*args_for(manifest, sim))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (out / "four.wav.restored.mp3").read_bytes() == restored_audio(
        (tmp_path / "four.wav").read_bytes())
    assert (out / "a/one.wav.restored.mp3").read_bytes() == restored_audio(
        (tmp_path / "a/one.wav").read_bytes())
    after = sim.stats()
    assert after["charges"] == 6 and after["generations_created"] == 6


def test_identical_files_share_one_generation(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2")
    manifest = file_manifest(tmp_path, [("one.wav", 300.0), ("copy/one.wav", 300.0)])
    done = run_batcher(*args_for(manifest, sim))
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(tmp_path / "m.ledger.sqlite")
    assert records[0]["generationId"] == records[1]["generationId"]
    assert Path(records[1]["output"]).read_bytes() == Path(records[0]["output"]).read_bytes()
    assert records[1]["output"].endswith("copy/one.wav.restored.mp3")
    stats = sim.stats()
    assert stats["projects_created"] == 1 and stats["charges"] == 1


def test_output_that_escapes_out_fails_only_that_row(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2")
    files = [("ok.wav", 300.0), ("evil.wav", 310.0), ("abs.wav", 320.0)]
    manifest = file_manifest(tmp_path, files, outputs={"evil.wav": "../../escape.mp3",
                                                       "abs.wav": "/tmp/abs-escape.mp3"})
    done = run_batcher(*args_for(manifest, sim))
    assert done.returncode == 1
    records = {r["line"]: r for r in export_records(tmp_path / "m.ledger.sqlite")}
    assert records[1]["status"] == "complete"
    for line in (2, 3):
        assert records[line]["status"] == "failed"
        assert records[line]["error"]["code"] == "invalidRow"
        assert "output" in records[line]["error"]["message"]
    assert not (tmp_path.parent / "escape.mp3").exists()
    assert not Path("/tmp/abs-escape.mp3").exists()
    assert sim.stats()["charges"] == 1


def test_file_edited_between_runs_is_reported_and_restored_anew(tmp_path: Path,
                                                                simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2")
    manifest = file_manifest(tmp_path, [("take.wav", 300.0), ("other.wav", 310.0)])
    assert run_batcher(*args_for(manifest, sim)).returncode == 0
    first = export_records(tmp_path / "m.ledger.sqlite")[0]
    write_wav(tmp_path / "take.wav", seconds=0.2, freq=999.0)  # new audio, same name
    again = run_batcher(*args_for(manifest, sim))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed" in again.stderr
    second = export_records(tmp_path / "m.ledger.sqlite")[0]
    assert second["rowId"] == first["rowId"]
    assert second["idempotencyKey"] != first["idempotencyKey"]
    assert second["generationId"] != first["generationId"]
    assert Path(second["output"]).read_bytes() == restored_audio(
        (tmp_path / "take.wav").read_bytes())
    stats = sim.stats()
    assert stats["charges"] == 3 and stats["extra_charges"] == 0


def _flip_when(sim: Any, endpoint: str, status: int, patch: dict[str, Any]) -> threading.Thread:
    """Once the simulator has answered ``status`` on ``endpoint``, apply ``patch``."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            by = sim.stats()["requests_by_endpoint"].get(endpoint, {})
            if by.get(str(status)):
                sim.configure(patch)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _storage_endpoints(sim: Any) -> set[str]:
    return set(sim.stats()["requests_by_endpoint"])


def test_expired_upload_url_means_a_fresh_project_not_a_second_charge(
        tmp_path: Path, simulator: Any) -> None:
    # The seed era's signed upload URL (today's upload sessions: tests/test_uploads.py).
    # Every upload URL is born expired until the first refusal; then normal.
    sim = simulator("--duration", "0.1,0.2", "--upload-ttl", "0", api="seed")
    manifest = file_manifest(tmp_path, [("take.wav", 300.0)])
    watcher = _flip_when(sim, "upload", 403, {"upload_ttl": 3600})
    # --rate 1 spaces the next create_project a second after the refusal.
    done = run_batcher(*args_for(manifest, sim, "--rate", "1", "--model", "diffio-3.5"))
    watcher.join(timeout=1)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = sim.stats()
    assert stats["requests_by_endpoint"]["upload"].get("403", 0) >= 1
    assert stats["projects_created"] >= 2
    assert stats["charges"] == 1 and stats["generations_without_upload"] == 0
    rec = export_records(tmp_path / "m.ledger.sqlite")[0]
    assert Path(rec["output"]).read_bytes() == restored_audio((tmp_path / "take.wav").read_bytes())


def test_expired_download_url_is_asked_for_again(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.2", "--download-ttl", "0")
    manifest = file_manifest(tmp_path, [("take.wav", 300.0)])
    watcher = _flip_when(sim, "download", 410, {"download_ttl": 7200})
    done = run_batcher(*args_for(manifest, sim, "--rate", "1"))
    watcher.join(timeout=1)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = sim.stats()
    assert stats["requests_by_endpoint"]["download"].get("410", 0) >= 1
    assert stats["requests_by_endpoint"]["get_generation_download"]["200"] >= 2
    assert stats["charges"] == 1


def test_file_edited_while_its_generation_runs_never_gets_the_old_output(
        tmp_path: Path, simulator: Any) -> None:
    import signal
    import subprocess
    import sys

    from conftest import batcher_env

    sim = simulator("--duration", "3,3")
    manifest = file_manifest(tmp_path, [("take.wav", 300.0)])
    proc = subprocess.Popen([sys.executable, "-m", "batcher", *args_for(manifest, sim)],
                            env=batcher_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not sim.stats()["generations_created"]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sim.stats()["generations_created"] == 1
    write_wav(tmp_path / "take.wav", seconds=0.2, freq=777.0)
    sim.configure({"duration": [0.1, 0.2]})
    done = run_batcher(*args_for(manifest, sim))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "abandoned" in done.stderr
    rec = export_records(tmp_path / "m.ledger.sqlite")[0]
    assert Path(rec["output"]).read_bytes() == restored_audio((tmp_path / "take.wav").read_bytes())
    stats = sim.stats()
    assert stats["generations_created"] == 2 and stats["extra_charges"] == 0

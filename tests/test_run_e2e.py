"""Real `batcher run` processes against a real simulator process.

Every test checks the export and the simulator's own counters: the rows the
runner says are complete, and what the API says it charged.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import batcher_env, export_records, kill_repeatedly, run_args, run_batcher

from batcher.ledger.sqlite import SqliteLedger
from batcher.model import Stage

CONTRACT_FIELDS = ["rowId", "line", "idempotencyKey", "apiProjectId", "generationId",
                   "modelKey", "status", "apiStatus", "error", "output", "attempts"]


def project_manifest(path: Path, n: int, *, extra: list[dict[str, Any]] | None = None) -> Path:
    rows = [{"apiProjectId": f"proj-{i:04d}", "prompt": f"clean {i}", "seed": str(i % 7)}
            for i in range(n)]
    rows += extra or []
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["apiProjectId", "prompt", "seed", "sampling"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def test_project_rows_complete_and_are_charged_once(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.2,0.6")
    # Two rows repeat the request of row 1 (7 and 7.0 are the same seed): one
    # logical request, one generation, three export records.
    extra = [{"apiProjectId": "proj-0001", "prompt": "clean 1", "seed": "1.0"},
             {"apiProjectId": "proj-0001", "prompt": "clean 1", "seed": "1"}]
    manifest = project_manifest(tmp_path / "m.csv", 20, extra=extra)
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "40", "--poll-interval", "0.2"))
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert len(records) == 22
    for rec in records:
        assert all(f in rec for f in CONTRACT_FIELDS)
        assert rec["status"] == "complete" and rec["apiStatus"] == "complete"
        assert rec["error"] is None and rec["output"] is None
        # A row that repeats another's request spends no request of its own.
        assert rec["attempts"] >= 1 if rec["leaderRowId"] is None else rec["attempts"] == 0
    assert [r["line"] for r in records] == list(range(1, 23))
    by_line = {r["line"]: r for r in records}
    assert by_line[21]["generationId"] == by_line[22]["generationId"] == by_line[2]["generationId"]
    assert by_line[22]["rowId"].endswith("~2") or by_line[21]["rowId"] != by_line[22]["rowId"]
    stats = sim.stats()
    assert stats["generations_created"] == 20
    assert stats["charges"] == 20
    assert stats["extra_charges"] == 0
    assert len({r["idempotencyKey"] for r in records}) == 20

    # Re-running the same command does nothing and pays nothing.
    again = run_batcher(*run_args(manifest, sim.base_url, "--rate", "40", "--poll-interval", "0.2"))
    assert again.returncode == 0
    assert "20 already complete" in again.stdout or "22 already complete" in again.stdout
    assert sim.stats()["charges"] == 20


def test_bad_rows_fail_with_line_and_field_others_complete(tmp_path: Path, simulator: Any
                                                           ) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "apiProjectId,file,prompt,params\n"
        "p-ok-1,,a,\n"
        "p-bad,x.wav,b,\n"          # both sources
        ",,c,\n"                    # neither
        "p-ok-2,,d,{\"x\": 1}\n"
        "p-badjson,,e,{not json\n"
        "p-ok-3,,f,\n"
    )
    done = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1", "--rate", "50"))
    assert done.returncode == 1, done.stdout + done.stderr
    records = {r["line"]: r for r in export_records(manifest.with_suffix(".sqlite"))}
    assert {line: r["status"] for line, r in records.items()} == {
        1: "complete", 2: "failed", 3: "failed", 4: "complete", 5: "failed", 6: "complete"}
    for line in (2, 3, 5):
        error = records[line]["error"]
        assert error["code"] == "invalidRow"
        assert "m.csv" in error["message"] and f"row {line}" in error["message"]
    assert "params" in records[5]["error"]["message"]
    assert sim.stats()["charges"] == 3


def test_unreadable_manifest_exits_2_and_sends_nothing(tmp_path: Path) -> None:
    done = run_batcher("run", str(tmp_path / "missing.csv"), "--api-base", "http://127.0.0.1:9")
    assert done.returncode == 2
    assert "missing.csv" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    (tmp_path / "m.txt").write_text("apiProjectId\np\n")
    assert run_batcher("run", str(tmp_path / "m.txt")).returncode == 2


def test_unknown_key_halts_with_exit_3_and_nothing_charged(tmp_path: Path, simulator: Any
                                                          ) -> None:
    sim = simulator("--auto-create-projects")
    manifest = project_manifest(tmp_path / "m.csv", 10)
    start = time.monotonic()
    done = run_batcher(*run_args(manifest, sim.base_url), env=batcher_env("wrong-key"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert time.monotonic() - start < 20
    assert "wrong-key" not in done.stdout + done.stderr
    assert sim.stats()["charges"] == 0
    records = export_records(manifest.with_suffix(".sqlite"))
    assert {r["status"] for r in records} == {"pending"}
    # Resumable: the right key finishes the job.
    ok = run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.5", "--rate", "50"))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_sigkill_at_random_moments_then_resume_pays_once(tmp_path: Path, simulator: Any
                                                         ) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.5,1.5", "--latency",
                    "0.005,0.02")
    manifest = project_manifest(tmp_path / "m.csv", 60)
    args = run_args(manifest, sim.base_url, "--rate", "40", "--poll-interval", "0.3")
    killed = sum(1 for _ in kill_repeatedly(args, seed=7, kills=6, window=(0.4, 1.6)))
    assert killed >= 3
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert len(records) == 60 and {r["status"] for r in records} == {"complete"}
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert stats["generations_created"] == 60


def test_lost_responses_and_500s_still_pay_once(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.3", "--lost-rate", "0.2",
                    "--error-rate", "0.1", "--seed", "3")
    manifest = project_manifest(tmp_path / "m.csv", 40)
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "60", "--poll-interval", "0.2"))
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert {r["status"] for r in records} == {"complete"}
    stats = sim.stats()
    assert stats["lost_responses"] > 0 and stats["errors_injected"] > 0
    assert stats["extra_charges"] == 0 and stats["generations_created"] == 40
    # The attempts spent on lost answers and 500s are in the ledger.
    assert sum(r["attempts"] for r in records) > stats["generations_created"] * 2


@pytest.mark.parametrize("rate", [5, 20])
def test_largest_one_second_window_stays_within_rate(tmp_path: Path, simulator: Any,
                                                     rate: int) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0,0.05")
    manifest = project_manifest(tmp_path / "m.csv", rate * 2)
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", str(rate),
                                 "--poll-interval", "0.05", "--concurrency", "32"))
    assert done.returncode == 0, done.stdout + done.stderr
    stats = sim.stats()
    assert stats["requests"] >= rate * 3  # enough traffic to fill several windows
    assert 0 < stats["max_requests_per_second_by_key"]["sim-key"] <= rate


def test_second_run_on_the_same_ledger_exits_4(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "5,6")
    manifest = project_manifest(tmp_path / "m.csv", 3)
    args = run_args(manifest, sim.base_url, "--poll-interval", "1")
    first = subprocess.Popen([sys.executable, "-m", "batcher", *args], env=batcher_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ledger = manifest.with_suffix(".sqlite")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not Path(f"{ledger}.lock").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        second = run_batcher(*args, timeout=30)
        assert second.returncode == 4, second.stdout + second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=20)
    assert first.returncode == 130


def test_sigint_saves_state_and_the_rerun_completes(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,2")
    manifest = project_manifest(tmp_path / "m.csv", 30)
    args = run_args(manifest, sim.base_url, "--rate", "20", "--poll-interval", "0.5")
    proc = subprocess.Popen([sys.executable, "-m", "batcher", *args], env=batcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    proc.wait(timeout=15)
    assert proc.returncode == 130
    assert time.monotonic() - start < 5

    async def check() -> None:
        ledger = SqliteLedger(manifest.with_suffix(".sqlite"))
        from batcher.report import read_info

        await ledger.open(read_info(), lock=False)
        try:
            counts = await ledger.counts()
        finally:
            await ledger.close()
        assert sum(counts.values()) > 0
        assert counts[Stage.SUBMITTED] + counts[Stage.COMPLETE] > 0

    import anyio

    anyio.run(check, backend="asyncio")
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sim.stats()["extra_charges"] == 0
    assert sim.stats()["generations_created"] == 30


def test_export_csv_has_the_contract_columns(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0,0.1")
    manifest = project_manifest(tmp_path / "m.csv", 3)
    assert run_batcher(*run_args(manifest, sim.base_url, "--poll-interval", "0.1")).returncode == 0
    out = tmp_path / "e.csv"
    done = run_batcher("export", str(manifest.with_suffix(".sqlite")), "--format", "csv",
                       "-o", str(out))
    assert done.returncode == 0
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert list(rows[0])[: len(CONTRACT_FIELDS)] == CONTRACT_FIELDS
    assert rows[0]["status"] == "complete" and rows[0]["error"] == ""
    status = run_batcher("status", str(manifest.with_suffix(".sqlite")), "--json")
    assert json.loads(status.stdout)["byStatus"]["complete"] == 3

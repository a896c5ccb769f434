"""The fault campaign: real `batcher run` processes under every fault.

Each test starts a real simulator process (or, for answers the simulator
cannot give, a tiny fake Diffio on a loopback port), runs the real CLI as a
subprocess, and judges the result from outside: exit status, the export, the
files on disk and the simulator's own counters (what it charged, how fast it
was hit). tests/test_run_e2e.py already covers a plain run, SIGKILL on a
small job, 20 % lost + 10 % 500s, rate windows at 5 and 20, the lock and
SIGINT; nothing here repeats those.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import (
    LoopbackApi,
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

# Every test here runs real `batcher` processes.
pytestmark = pytest.mark.slow

TRACEBACK = "Traceback (most recent call last)"


# ----------------------------------------------------------------- helpers


def project_manifest(path: Path, n: int) -> Path:
    """``n`` apiProjectId rows, each its own logical request."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["apiProjectId", "prompt", "seed"])
        for i in range(n):
            writer.writerow([f"proj-{i:04d}", f"clean {i}", str(i % 5)])
    return path


def file_manifest(folder: Path, n: int) -> tuple[Path, list[Path]]:
    """``n`` distinct small WAVs in nested folders, and a manifest naming them."""
    files = []
    for i in range(n):
        sub = ["", "a", "a/b", "c/d/e"][i % 4]
        rel = f"{sub}/take{i:02d}.wav".lstrip("/")
        files.append(write_wav(folder / rel, seconds=0.1 + (i % 3) * 0.05,
                               freq=200.0 + 7 * i))
    manifest = folder / "m.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "prompt"])
        for path in files:
            writer.writerow([str(path.relative_to(folder)), "clean"])
    return manifest, files


def mixed_manifest(folder: Path, files: int, projects: int) -> tuple[Path, list[Path]]:
    """``file_manifest``'s WAVs, then ``projects`` apiProjectId rows, in one manifest."""
    _, paths = file_manifest(folder, files)
    manifest = folder / "mixed.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["apiProjectId", "file", "prompt"])
        for path in paths:
            writer.writerow(["", str(path.relative_to(folder)), "clean"])
        for i in range(projects):
            writer.writerow([f"p-{i:02d}", "", "clean"])
    return manifest, paths


def start_run(args: list[str], env: dict[str, str] | None = None,
              ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batcher", *args],
                            env=env or batcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert TRACEBACK not in done.stderr + done.stdout, done.stderr[-3000:]


class FakeDiffio(LoopbackApi):
    """A tiny Diffio in a thread of this process, for answers the simulator never gives.

    By default it accepts every generation (``queued``) and reports it
    ``complete`` on the first poll. Tests replace :meth:`answer` to misbehave.
    ``hits`` holds (arrival time, endpoint, request number) of every API call,
    ``bodies`` their JSON bodies.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[float, str, int]] = []
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        number = len(self.hits) + 1
        self.hits.append((time.monotonic(), endpoint, number))
        try:
            body = await request.json()
        except ValueError:
            body = {}
        self.bodies.append(body)
        return self.answer(endpoint, body, number)

    def answer(self, endpoint: str, body: dict[str, Any], number: int) -> web.StreamResponse:
        """A well-behaved answer; override to misbehave."""
        if endpoint.endswith("-generation"):
            project = str(body.get("apiProjectId"))
            # The project is readable in the id, so misbehaving tests can
            # pick their victims by project.
            gen = f"gen-{project}-" + hashlib.sha256(
                str(body.get("idempotencyKey")).encode()).hexdigest()[:12]
            return web.json_response({"generationId": gen, "apiProjectId": project,
                                      "modelKey": "diffio-3.5", "status": "queued"})
        if endpoint == "get_generation_progress":
            return web.json_response(self.progress(body, "complete"))
        return web.json_response({"error": "not here", "code": "notFound"}, status=404)

    @staticmethod
    def progress(body: dict[str, Any], status: str) -> dict[str, Any]:
        stage = {"jobId": "job", "jobState": "SUCCEEDED", "status": "complete",
                 "progress": 100, "statusMessage": None, "error": None, "errorDetails": None}
        return {"generationId": body.get("generationId"),
                "apiProjectId": body.get("apiProjectId") or "p", "status": status,
                "hasVideo": False, "preProcessing": stage, "inference": stage,
                "error": None, "errorDetails": None}

    def arrivals(self, start: float, end: float) -> int:
        """API calls that arrived in [start, end)."""
        return sum(1 for t, _, _ in self.hits if start <= t < end)

    def max_window(self, width: float = 1.0) -> int:
        """The most calls in any window of ``width`` seconds."""
        times = [t for t, _, _ in self.hits]
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while times[lo] <= t - width:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


# ------------------------------------------------------------------ crashes


def test_crash_campaign_sigkill_20_times_pays_each_request_once(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,3", "--seed", "11")
    manifest = project_manifest(tmp_path / "m.csv", 200)
    args = run_args(manifest, sim.base_url, "--rate", "40", "--poll-interval", "0.3",
                    "--concurrency", "16")
    # The simulator's stats at each kill of a live process.
    at_kills = [sim.stats() for _ in kill_repeatedly(args, seed=5, kills=22, window=(0.3, 1.1))]
    created = [s["generations_created"] for s in at_kills]
    assert len(at_kills) >= 20, f"the job ended after {len(at_kills)} kills: {created}"
    # The kills fell across the job's life, most of them while it was still
    # creating generations (the moments a lost record would cost money).
    assert sum(0 < c < 200 for c in created) >= 10, created
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert len(records) == 200 and count_statuses(records) == {"complete": 200}
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert stats["generations_created"] == 200 and stats["charges"] == 200


@pytest.mark.parametrize("api", ["current", "seed"])
def test_crash_campaign_on_file_rows_outputs_match_inputs(tmp_path: Path, simulator: Any,
                                                          api: str) -> None:
    sim = simulator("--duration", "0.3,1", "--latency", "0.01,0.03", "--seed", "12", api=api)
    manifest, files = file_manifest(tmp_path, 36)
    model = ["--model", "diffio-3.5"] if api == "seed" else []
    args = run_args(manifest, sim.base_url, "--rate", "25", "--poll-interval", "0.2",
                    "--concurrency", "8", *model)
    # The simulator's stats at each kill of a live process.
    at_kills = [sim.stats() for _ in kill_repeatedly(
        args, seed=6, kills=16, window=(0.1, 0.8), activity=lambda: sim.stats()["requests"])]
    # Files in place at the API: one PUT each (seed), or confirmed uploads in parts.
    phases = [(s["uploads"] + s["projects_confirmed"], s["downloads"]) for s in at_kills]
    assert len(at_kills) >= 10, phases
    # Kills landed while files were still being uploaded, and while results
    # were being downloaded.
    assert any(0 < up < 36 for up, _ in phases), phases
    assert any(0 < down < 36 for _, down in phases), phases
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert count_statuses(records) == {"complete": 36}
    out = tmp_path / "m.out"
    for path, rec in zip(files, records, strict=True):
        expected = out / path.relative_to(tmp_path).with_name(path.name + ".restored.mp3")
        assert rec["output"] == str(expected)
        assert expected.read_bytes() == restored_audio(path.read_bytes()), expected
    # Nothing half-written is left behind, under a final name or a temp one.
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(
        out / p.relative_to(tmp_path).with_name(p.name + ".restored.mp3") for p in files)
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert stats["generations_created"] == 36 and stats["charges"] == 36
    assert stats["generations_without_upload"] == 0
    assert stats["signed_url_requests_with_key"] == stats["api_keys_at_upload_host"] == 0
    if api == "current":
        assert stats["projects_confirmed"] == 36 and stats["generations_upload_missing"] == 0


def test_sigterm_exits_130_with_a_consistent_ledger_and_the_rerun_completes(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "1,2")
    manifest = project_manifest(tmp_path / "m.csv", 40)
    args = run_args(manifest, sim.base_url, "--rate", "20", "--poll-interval", "0.3")
    proc = start_run(args)
    wait_for(lambda: sim.stats()["generations_created"] >= 8)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, out + err
    assert time.monotonic() - start < 5
    assert TRACEBACK not in err, err
    ledger = manifest.with_suffix(".sqlite")
    status = run_batcher("status", str(ledger), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["total"] == 40
    by = info["byStatus"]
    # What the API accepted is in the ledger, nothing invented; only posts cut
    # on the wire by the signal (at most --concurrency) may be missing, and
    # the re-run re-posts them with the same key.
    assert by["submitted"] + by["complete"] >= sim.stats()["generations_created"] - 16
    assert by["submitted"] + by["complete"] <= sim.stats()["generations_created"]
    assert info["lastRun"]["exit_code"] == 130
    done = run_batcher(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_statuses(export_records(ledger)) == {"complete": 40}
    stats = sim.stats()
    assert stats["extra_charges"] == 0 and stats["generations_created"] == 40


# ---------------------------------------------------------------- rate limits


class Timeline:
    """Samples the simulator's counters in a thread: (t, requests, 429s)."""

    def __init__(self, sim: Any, every: float = 0.04) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self._sim = sim
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            stats = self._sim.stats()
            self.samples.append((time.monotonic(), stats["requests"], stats["rate_limited"]))
            time.sleep(self._every)

    def first_429s(self) -> list[float]:
        """Moments the 429 count went up."""
        return [t for (t, _, r), (_, _, prev) in zip(self.samples[1:], self.samples,
                                                       strict=False) if r > prev]

    def requests_between(self, start: float, end: float) -> int:
        before = [n for t, n, _ in self.samples if t <= start]
        after = [n for t, n, _ in self.samples if t >= end]
        assert before and after, "the timeline does not cover that span"
        return after[0] - before[-1]


def test_429_storm_pauses_every_worker_and_slows_the_whole_run(tmp_path: Path, simulator: Any
                                                                ) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.2,0.5", "--rate-limit", "15",
                    "--seed", "4")
    manifest = project_manifest(tmp_path / "m.csv", 60)
    report = tmp_path / "report.json"
    start = time.monotonic()
    with Timeline(sim) as timeline:
        done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "50",
                                     "--poll-interval", "0.3", "--report", str(report)))
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_statuses(export_records(manifest.with_suffix(".sqlite"))) == {"complete": 60}
    stats = sim.stats()
    assert stats["extra_charges"] == 0 and stats["generations_created"] == 60
    # The storm happened, and the 429s stayed a small share of the traffic.
    assert stats["rate_limited"] >= 1
    assert stats["rate_limited"] < 0.25 * stats["requests"]
    # Slowed down globally: the server never saw the asked-for 50 per second,
    # only its own 15 and the few requests already on their way.
    assert stats["max_requests_per_second_by_key"]["sim-key"] <= 20
    # Neither hammering nor collapsing to a crawl: near the server's 15/s.
    assert 5 <= stats["requests"] / wall <= 16
    # Retry-After (1 s here) pauses every worker: right after each 429 the
    # server hears nothing at all, not just nothing from the one that got it.
    for t in timeline.first_429s():
        if t + 0.8 < timeline.samples[-1][0]:
            assert timeline.requests_between(t + 0.15, t + 0.75) == 0, t - start
    # The report tells the same story.
    report_data = json.loads(report.read_text())
    assert report_data["rateLimited"] == stats["rate_limited"]
    assert report_data["requests"] == stats["requests"]


class OneRetryAfter(FakeDiffio):
    """Answers request number ``at`` with 429 and ``Retry-After: 2``, once."""

    at = 40

    def answer(self, endpoint: str, body: dict[str, Any], number: int) -> web.StreamResponse:
        if number == self.at:
            return web.json_response({"error": "Rate limit exceeded.", "code": "rateLimited"},
                                     status=429, headers={"Retry-After": "2"})
        return super().answer(endpoint, body, number)


def test_retry_after_pauses_everyone_then_the_rate_is_cut_and_recovers(tmp_path: Path
                                                                        ) -> None:
    manifest = project_manifest(tmp_path / "m.csv", 130)
    with OneRetryAfter() as fake:
        done = run_batcher(*run_args(manifest, fake.base_url, "--rate", "50",
                                     "--poll-interval", "0.05", "--concurrency", "16"))
    assert done.returncode == 0, done.stdout + done.stderr
    t429 = next(t for t, _, n in fake.hits if n == OneRetryAfter.at)
    assert fake.hits[-1][0] > t429 + 6, "too little traffic after the 429 to judge"
    # Retry-After: 2 silences every worker for 2 s, not only the one that got it.
    assert fake.arrivals(t429 + 0.1, t429 + 1.95) == 0
    after = [fake.arrivals(t429 + 2 + i, t429 + 3 + i) for i in range(4)]
    # Then a multiplicative cut (about half of 50 per second) ...
    assert 8 <= after[0] <= 30, after
    # ... and an additive recovery: the rate grows back second by second.
    assert after[2] + after[3] >= after[0] + after[1] + 8, after
    # Never above --rate in any 1 s window, burst after the pause included.
    assert fake.max_window() <= 50


def test_rate_200_is_never_exceeded_over_any_second(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0,0.05")
    manifest = project_manifest(tmp_path / "m.csv", 400)
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "200", "--poll-interval",
                                 "0.05", "--concurrency", "32"))
    assert done.returncode == 0, done.stdout + done.stderr
    stats = sim.stats()
    assert stats["requests"] >= 700  # several seconds' worth at 200/s
    # Busy enough to press on the limit, and never over it.
    assert 100 <= stats["max_requests_per_second_by_key"]["sim-key"] <= 200


# ------------------------------------------------------------- halts (exit 3)


def test_spend_limit_halts_finishes_in_flight_and_resumes_after_raise(
        tmp_path: Path, simulator: Any) -> None:
    # 0.06 USD a generation: a 0.5 limit lets 8 through, the 9th is refused.
    sim = simulator("--auto-create-projects", "--duration", "0.5,1", "--spend-limit", "0.5")
    manifest = project_manifest(tmp_path / "m.csv", 20)
    args = run_args(manifest, sim.base_url, "--rate", "50", "--poll-interval", "0.2")
    done = run_batcher(*args)
    assert done.returncode == 3, done.stdout + done.stderr
    no_traceback(done)
    output = done.stdout + done.stderr
    assert "402" in output
    for figure in ("spendLimitUsd=0.5", "usedUsd=", "pendingUsd=", "estimatedCostUsd=0.06"):
        assert figure in output, figure
    records = export_records(manifest.with_suffix(".sqlite"))
    # What the API accepted was polled to its end; the rest waits, resumable.
    assert count_statuses(records) == {"complete": 8, "pending": 12}
    assert {r["error"]["httpStatus"] for r in records if r["status"] == "pending"
            and r["error"] is not None} <= {402}
    stats = sim.stats()
    assert stats["generations_created"] == 8 and stats["spend_limit_refusals"] >= 1
    # Stopped submitting: only posts already under way (--concurrency 16)
    # met a 402 (finding 1 asks for fewer: none that were still queued).
    assert stats["spend_limit_refusals"] <= 16

    sim.configure({"api_keys": {"sim-key": {"spend_limit_usd": 1000}}})
    again = run_batcher(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    records = export_records(manifest.with_suffix(".sqlite"))
    assert count_statuses(records) == {"complete": 20}
    stats = sim.stats()
    assert stats["extra_charges"] == 0
    assert stats["generations_created"] == 20 and stats["charges"] == 20


@pytest.mark.parametrize(("spec", "code"), [({"active": False}, "apiKeyInactive"),
                                            ({"write": False}, "permissionDenied")])
def test_inactive_key_or_key_without_write_halts_with_exit_3(
        tmp_path: Path, simulator: Any, spec: dict[str, Any], code: str) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    sim.configure({"api_keys": {"sim-key": spec}})
    manifest = project_manifest(tmp_path / "m.csv", 30)
    args = run_args(manifest, sim.base_url, "--rate", "50", "--poll-interval", "0.2")
    start = time.monotonic()
    done = run_batcher(*args)
    assert done.returncode == 3, done.stdout + done.stderr
    assert time.monotonic() - start < 10
    no_traceback(done)
    assert code in done.stdout + done.stderr
    stats = sim.stats()
    assert stats["charges"] == 0
    # Halted at once, not one refusal per row.
    assert stats["requests"] <= 20
    assert count_statuses(export_records(manifest.with_suffix(".sqlite"))) == {"pending": 30}
    # Resumable: once the key is fixed the same command finishes the job.
    sim.configure({"api_keys": {"sim-key": {"active": True, "write": True}}})
    again = run_batcher(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sim.stats()["generations_created"] == 30


def test_project_of_another_key_fails_its_row_only(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.3", "--api-key", "sim-key",
                    "--api-key", "other-key")
    req = urllib.request.Request(
        sim.root + "/_sim/projects", method="POST",
        data=json.dumps({"apiKey": "other-key", "apiProjectId": "p-other"}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    manifest = tmp_path / "m.csv"
    manifest.write_text("apiProjectId,prompt\n" + "".join(
        f"{'p-other' if i == 3 else f'p-mine-{i}'},clean\n" for i in range(8)))
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "50",
                                 "--poll-interval", "0.2"))
    assert done.returncode == 1, done.stdout + done.stderr
    no_traceback(done)
    records = {r["line"]: r for r in export_records(manifest.with_suffix(".sqlite"))}
    assert records[4]["status"] == "failed"
    assert records[4]["error"]["httpStatus"] == 403
    assert "own" in records[4]["error"]["message"]
    assert all(r["status"] == "complete" for line, r in records.items() if line != 4)
    stats = sim.stats()
    assert stats["charges_by_key"] == {"sim-key": 7}
    assert stats["extra_charges"] == 0


# ----------------------------------------------------------------- bad input


def test_csv_mixing_good_rows_with_every_kind_of_bad_one(tmp_path: Path, simulator: Any
                                                         ) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    write_wav(tmp_path / "audio" / "take.wav")
    long_key = "k" * 256
    lines = [
        "apiProjectId,file,prompt,params,idempotencyKey,promt",  # promt: a typo
        "p-good-1,,clean,,,",                      # row 1
        "p-both,audio/take.wav,x,,,",              # row 2: both sources
        ",,neither,,,",                            # row 3: neither
        "p-json,,x,{bad json,,",                   # row 4: params not JSON
        ",audio/missing.wav,x,,,",                 # row 5: no such file
        f"p-longkey,,x,,{long_key},",              # row 6: key over 255
        "",                                        # not a row
        "p-typo,,,,,clean it",                     # row 7: value in the typo column
        ",audio/take.wav,ok,,,",                   # row 8
        'p-good-2,,clean,"{""x"": 1}",,',          # row 9
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "50",
                                 "--poll-interval", "0.1"))
    assert done.returncode == 1, done.stdout + done.stderr
    no_traceback(done)
    records = {r["line"]: r for r in export_records(manifest.with_suffix(".sqlite"))}
    assert sorted(records) == list(range(1, 10))
    good = {1: "p-good-1", 8: None, 9: "p-good-2"}
    for line, project in good.items():
        assert records[line]["status"] == "complete", records[line]
        if project:  # the BOM and the CR did not stick to any value
            assert records[line]["apiProjectId"] == project
    expected = {2: ("apiProjectId", "file"), 3: ("neither", "apiProjectId", "file"),
                4: ("params", "JSON"),
                5: ("file", "missing.wav"), 6: ("idempotencyKey", "255"),
                7: ("promt", "prompt")}
    for line, words in expected.items():
        rec = records[line]
        assert rec["status"] == "failed", rec
        assert rec["error"]["code"] == "invalidRow"
        message = rec["error"]["message"]
        assert f"row {line}" in message and "m.csv" in message, message
        for word in words:
            assert word in message, (word, message)
        # Reported as the run goes too, with the row number, not only in the ledger.
        assert f"row {line}" in done.stderr, done.stderr
    stats = sim.stats()
    assert stats["generations_created"] == 3 and stats["extra_charges"] == 0


def test_jsonl_with_a_non_json_line_and_a_non_object_line(tmp_path: Path, simulator: Any
                                                         ) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.2")
    write_wav(tmp_path / "take.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"apiProjectId": "p-good-1", "prompt": "clean"}),   # row 1
        "{this is not json",                                           # row 2
        json.dumps([1, 2, 3]),                                         # row 3
        "",                                                            # not a row
        json.dumps("just a string"),                                   # row 4
        json.dumps({"file": "take.wav", "params": {"prompt": "x"}}),   # row 5
        json.dumps({"apiProjectId": 5}),                               # row 6
        json.dumps({"apiProjectId": "p-good-2", "sampling": {"seed": 3}}),  # row 7
    ]) + "\n")
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "50",
                                 "--poll-interval", "0.1"))
    assert done.returncode == 1, done.stdout + done.stderr
    no_traceback(done)
    records = {r["line"]: r for r in export_records(manifest.with_suffix(".sqlite"))}
    assert {line: r["status"] for line, r in records.items()} == {
        1: "complete", 2: "failed", 3: "failed", 4: "failed", 5: "complete", 6: "failed",
        7: "complete"}
    for line in (2, 3, 4, 6):
        error = records[line]["error"]
        assert error["code"] == "invalidRow"
        assert f"row {line}" in error["message"] and "m.jsonl" in error["message"]
    assert "JSON" in records[2]["error"]["message"]
    assert "object" in records[3]["error"]["message"]
    assert "object" in records[4]["error"]["message"]
    assert "apiProjectId" in records[6]["error"]["message"]
    assert sim.stats()["generations_created"] == 3


# ---------------------------------------------------------------- bad answers


def test_html_502_pages_and_truncated_json_are_retried_to_completion(
        tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--duration", "0.1,0.3", "--html-rate", "0.2", "--truncated-rate", "0.2",
                    "--auto-create-projects", "--seed", "21")
    manifest, files = mixed_manifest(tmp_path, 8, 24)
    # 36 % of answers are bad: ten attempts make a row's failure unlikely.
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "60", "--poll-interval",
                                 "0.2", "--max-attempts", "10", "-v"))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    no_traceback(done)
    records = export_records(manifest.with_suffix(".sqlite"))
    assert count_statuses(records) == {"complete": 32}
    for path, rec in zip(files, records[:8], strict=True):
        assert Path(rec["output"]).read_bytes() == restored_audio(path.read_bytes())
    stats = sim.stats()
    assert stats["html_errors_injected"] >= 5 and stats["truncated_responses"] >= 5
    assert stats["extra_charges"] == 0
    assert stats["generations_created"] == 32 and stats["generations_without_upload"] == 0


class BadAnswers(FakeDiffio):
    """Answers that break the API's promises, each for one project."""

    def answer(self, endpoint: str, body: dict[str, Any], number: int) -> web.StreamResponse:
        project = str(body.get("apiProjectId"))
        if endpoint.endswith("-generation") and project == "p-nogen":
            # 200 without the generationId every caller needs.
            return web.json_response({"apiProjectId": project, "status": "queued"})
        if endpoint == "get_generation_progress" and project == "p-weird":
            return web.json_response(self.progress(body, "weird"))
        if endpoint == "get_generation_progress" and project == "p-nostatus":
            answer = self.progress(body, "complete")
            del answer["status"]
            return web.json_response(answer)
        return super().answer(endpoint, body, number)


def test_200_without_required_fields_and_unknown_status_fail_their_rows_only(
        tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    projects = ["p-ok-1", "p-nogen", "p-ok-2", "p-weird", "p-nostatus", "p-ok-3"]
    manifest.write_text("apiProjectId\n" + "".join(f"{p}\n" for p in projects))
    with BadAnswers() as fake:
        done = run_batcher(*run_args(manifest, fake.base_url, "--rate", "50",
                                     "--poll-interval", "0.05", "--max-attempts", "3"))
    assert done.returncode == 1, done.stdout + done.stderr
    no_traceback(done)
    records = {r["apiProjectId"]: r for r in export_records(manifest.with_suffix(".sqlite"))}
    for project in ("p-ok-1", "p-ok-2", "p-ok-3"):
        assert records[project]["status"] == "complete"
    nogen = records["p-nogen"]
    assert nogen["status"] == "failed" and nogen["error"]["code"] == "badResponse"
    assert "generationId" in nogen["error"]["message"]
    # Retried a bounded number of times, always with the same key (a replay
    # if the API had in fact created it).
    posts = [b for (_, endpoint, _), b in zip(fake.hits, fake.bodies, strict=True)
             if endpoint.endswith("-generation") and b.get("apiProjectId") == "p-nogen"]
    assert len(posts) == 3 == nogen["attempts"]
    assert {b["idempotencyKey"] for b in posts} == {nogen["idempotencyKey"]}
    weird = records["p-weird"]
    assert weird["status"] == "failed" and weird["error"]["code"] == "unknownStatus"
    assert "weird" in weird["error"]["message"] and weird["apiStatus"] == "weird"
    nostatus = records["p-nostatus"]
    assert nostatus["status"] == "failed" and nostatus["error"]["code"] == "badResponse"
    assert "'status'" in nostatus["error"]["message"]
    # The summary names them too.
    assert "unknownStatus" in done.stdout and "badResponse" in done.stdout


# -------------------------------------------------------------------- secrets

CANARY = "sk-SECRET-canary-1234"


def files_containing(root: Path, secret: str) -> list[Path]:
    needle = secret.encode()
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_the_api_key_appears_nowhere_after_a_faulty_run(tmp_path: Path, simulator: Any
                                                        ) -> None:
    sim = simulator("--api-key", CANARY, "--auto-create-projects", "--duration", "0.1,0.3",
                    "--error-rate", "0.1", "--lost-rate", "0.1", "--html-rate", "0.1",
                    "--truncated-rate", "0.1", "--seed", "8")
    manifest, _ = mixed_manifest(tmp_path, 6, 12)
    report, metrics = tmp_path / "report.json", tmp_path / "metrics.prom"
    env = batcher_env(CANARY)
    args = run_args(manifest, sim.base_url, "--rate", "60", "--poll-interval", "0.2",
                    "--max-attempts", "10", "--report", str(report), "--metrics", str(metrics),
                    "-vv", "--log-json")
    # First killed mid-run, so the SQLite write-ahead log is still on disk.
    proc = start_run(args, env=env)
    wait_for(lambda: sim.stats()["generations_created"] >= 4)
    proc.kill()
    out, err = proc.communicate(timeout=10)
    ledger = manifest.with_suffix(".sqlite")
    assert Path(f"{ledger}-wal").exists()
    assert CANARY not in out + err
    assert files_containing(tmp_path, CANARY) == []
    done = run_batcher(*args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    logged = [json.loads(line) for line in (err + done.stderr).splitlines()
              if line.startswith("{")]
    assert len(logged) > 10  # -vv --log-json really logged, retries included
    export = run_batcher("export", str(ledger), "--format", "csv", "-o",
                         str(tmp_path / "export.csv"), env=env)
    status = run_batcher("status", str(ledger), "-vv", env=env)
    assert export.returncode == 0 and status.returncode == 0
    for text in (done.stdout, done.stderr, status.stdout, status.stderr,
                 json.dumps(export_records(ledger))):
        assert CANARY not in text
    assert report.exists() and metrics.exists() and ledger.exists()
    assert files_containing(tmp_path, CANARY) == []
    stats = sim.stats()
    assert stats["errors_injected"] + stats["lost_responses"] > 0
    assert stats["projects_confirmed"] == 6 and stats["downloads"] >= 6
    assert stats["signed_url_requests_with_key"] == stats["api_keys_at_upload_host"] == 0


class EchoesTheKey(FakeDiffio):
    """A hostile server that puts the caller's Authorization header in its answers."""

    def __init__(self) -> None:
        super().__init__()
        self.key_seen = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.key_seen = request.headers.get("Authorization", "")
        return await super().handle(request)

    def answer(self, endpoint: str, body: dict[str, Any], number: int) -> web.StreamResponse:
        key = self.key_seen
        project = str(body.get("apiProjectId"))
        if project == "p-400":
            return web.json_response({"error": f"bad request from {key}", "code": "x" + key},
                                     status=400)
        if project == "p-502":
            return web.Response(status=502, text=f"<html>upstream saw {key}</html>",
                                content_type="text/html")
        if endpoint == "get_generation_progress" and project == "p-failed":
            answer = self.progress(body, "failed")
            answer["error"] = f"inference failed for {key}"
            answer["errorDetails"] = f"details: {key}"
            return web.json_response(answer)
        return super().answer(endpoint, body, number)


def test_a_server_echoing_the_key_cannot_make_batcher_write_it(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("apiProjectId\np-ok\np-400\np-502\np-failed\n")
    env = batcher_env(CANARY)
    with EchoesTheKey() as fake:
        done = run_batcher(*run_args(manifest, fake.base_url, "--rate", "50",
                                     "--poll-interval", "0.05", "--max-attempts", "2",
                                     "--report", str(tmp_path / "r.json"), "-vv"), env=env)
        assert fake.key_seen == f"Bearer {CANARY}"
    assert done.returncode == 1, done.stdout + done.stderr
    no_traceback(done)
    records = {r["apiProjectId"]: r for r in export_records(manifest.with_suffix(".sqlite"))}
    assert records["p-ok"]["status"] == "complete"
    assert {records[p]["status"] for p in ("p-400", "p-502", "p-failed")} == {"failed"}
    assert CANARY not in done.stdout + done.stderr
    assert CANARY not in json.dumps(records)
    assert files_containing(tmp_path, CANARY) == []
    # The rest of the server's words are kept: the redaction is surgical.
    assert "bad request from" in records["p-400"]["error"]["message"]
    assert "inference failed" in records["p-failed"]["error"]["message"]


# ------------------------------------------------------------------ findings


def test_a_402_stops_submissions_still_waiting_for_the_rate_gate(tmp_path: Path,
                                                                 simulator: Any) -> None:
    # At 5 requests/s the 16 submit workers queue at the rate gate; after the
    # 402 none of them has been sent yet, and none should be.
    sim = simulator("--auto-create-projects", "--duration", "0.5,1", "--spend-limit", "0.2")
    manifest = project_manifest(tmp_path / "m.csv", 30)
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "5",
                                 "--poll-interval", "0.3"))
    assert done.returncode == 3, done.stdout + done.stderr
    stats = sim.stats()
    assert stats["generations_created"] == 3
    assert stats["spend_limit_refusals"] <= 2


def test_rows_that_complete_after_a_halt_carry_no_stale_error(tmp_path: Path, simulator: Any
                                                              ) -> None:
    sim = simulator("--auto-create-projects", "--duration", "0.1,0.3", "--spend-limit", "0.2")
    manifest = project_manifest(tmp_path / "m.csv", 8)
    args = run_args(manifest, sim.base_url, "--rate", "50", "--poll-interval", "0.2")
    assert run_batcher(*args).returncode == 3
    halted = [r for r in export_records(manifest.with_suffix(".sqlite"))
              if r["status"] == "pending"]
    assert halted and any(r["error"] for r in halted)
    sim.configure({"api_keys": {"sim-key": {"spend_limit_usd": 1000}}})
    assert run_batcher(*args).returncode == 0
    records = export_records(manifest.with_suffix(".sqlite"))
    assert count_statuses(records) == {"complete": 8}
    # A complete row says error: null; the 402 of an earlier run is history.
    assert [r["line"] for r in records if r["error"] is not None] == []
    status = run_batcher("status", str(manifest.with_suffix(".sqlite")), "--json")
    assert json.loads(status.stdout)["topErrors"] == []


def row_latencies(ledger_path: Path) -> list[float]:
    """Seconds from accepted to complete, per row in manifest order (ledger events)."""
    from batcher.ledger.sqlite import SqliteLedger
    from batcher.model import RunInfo

    async def read() -> list[float]:
        ledger = SqliteLedger(ledger_path)
        await ledger.open(RunInfo.reader(), lock=False)
        try:
            out = []
            for row in sorted([r async for r in ledger.rows()], key=lambda r: r.line):
                events = await ledger.events(row.row_id)
                accepted = next(e.at for e in events if e.event in ("submitted", "replayed"))
                done = next(e.at for e in events if e.event == "complete")
                out.append(done - accepted)
            return out
        finally:
            await ledger.close(None)

    return asyncio.run(read())


def test_first_polls_do_not_drift_later_through_a_long_rate_bound_run(
        tmp_path: Path, simulator: Any) -> None:
    # Generations finish within 0.1 s; the rate gate is the bottleneck all
    # along, so every row waits about as long as every other. A poller that
    # learns "how long generations take" from its own (queued) first polls
    # ratchets its first wait up and the late rows wait longer and longer.
    sim = simulator("--auto-create-projects", "--duration", "0,0.1")
    manifest = project_manifest(tmp_path / "m.csv", 150)
    done = run_batcher(*run_args(manifest, sim.base_url, "--rate", "30",
                                 "--poll-interval", "0.2"))
    assert done.returncode == 0, done.stdout + done.stderr
    latencies = row_latencies(manifest.with_suffix(".sqlite"))
    quarter = len(latencies) // 4
    early = statistics.median(latencies[:quarter])
    late = statistics.median(latencies[-quarter:])
    assert late <= 1.5 * early + 0.3, (early, late)

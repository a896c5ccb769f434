"""Webhooks end to end, with real processes: `batcher simulate` delivering signed
events to `batcher run --webhook-listen` (or `batcher webhooks serve`).

What each test shows:

- every event delivered: about one API request per project row, all complete;
- 30 % of events dropped, the rest duplicated and reordered: all complete,
  and rows are polled only for the dropped endings: polls ≤ 2 × the
  terminal events dropped (+3), never a second charge;
- forged, tampered, replayed, stale-stamped and out-of-order deliveries
  change nothing in the ledger, and each kind is counted;
- `webhooks serve` killed with SIGKILL while events arrive loses none it
  acknowledged (a 2xx comes only after the ledger's commit).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from conftest import batcher_env, run_batcher

from batcher.ledger import SqliteLedger
from batcher.model import Kind, NewRow, RunInfo, Stage
from batcher.webhooks import GenerationEvent, WebhookSecret, signed_headers

pytestmark = pytest.mark.slow

SECRET = WebhookSecret(bytes(range(1, 25)))
SECRET_ENV = {"E2E_WEBHOOK_SECRET": SECRET.reveal()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def manifest(path: Path, rows: int) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["apiProjectId", "seed"])
        for i in range(rows):
            writer.writerow([f"proj-{i:04d}", i])
    return path


def sim_json(sim: Any, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(sim.root + path, timeout=10) as resp:
        found: dict[str, Any] = json.loads(resp.read())
        return found


def run_with_webhooks(tmp_path: Path, simulator: Any, rows: int, *faults: str,
                      poll_interval: str = "1") -> tuple[dict[str, Any], Any, Path]:
    """`batcher simulate` posting to the run's receiver; the run's report, the sim, the ledger."""
    port = free_port()
    sim = simulator("--auto-create-projects", "--duration", "2,4",
                    "--webhook-url", f"http://127.0.0.1:{port}/diffio/events",
                    "--webhook-secret-env", "E2E_WEBHOOK_SECRET", *faults)
    source = manifest(tmp_path / "m.csv", rows)
    report = tmp_path / "report.json"
    env = batcher_env(**SECRET_ENV)
    # The simulator process read the secret from its own environment.
    done = run_batcher("run", str(source), "--api-base", sim.base_url, "--rate", "50",
                       "--poll-interval", poll_interval, "--webhook-listen", str(port),
                       "--webhook-secret-env", "E2E_WEBHOOK_SECRET", "--report", str(report),
                       "-q", env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert SECRET.reveal() not in done.stdout + done.stderr
    return json.loads(report.read_text()), sim, tmp_path / "m.ledger.sqlite"


@pytest.fixture
def simulator(monkeypatch: pytest.MonkeyPatch) -> Any:
    """conftest's simulator factory, with the webhook secret in its environment."""
    from conftest import start_simulator

    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    started: list[Any] = []

    def factory(*args: str) -> Any:
        sim = start_simulator(*args)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


def test_every_event_delivered_costs_about_one_request_per_row(tmp_path: Path,
                                                               simulator: Any) -> None:
    rows = 150
    report, sim, ledger = run_with_webhooks(tmp_path, simulator, rows)
    assert report["counts"]["complete"] == rows
    # The secret is in no file the run wrote.
    for written in (ledger, tmp_path / "report.json"):
        assert SECRET.reveal().encode() not in written.read_bytes()
        assert SECRET.reveal_key() not in written.read_bytes()
    assert report["requests"] / rows <= 1.1, report["requestsByEndpoint"]
    hooks = report["webhooks"]
    assert hooks["eventsApplied"] + report["polls"] >= rows
    assert hooks["refused"] == dict.fromkeys(hooks["refused"], 0)
    stats = sim.stats()
    assert stats["charges"] == rows and stats["extra_charges"] == 0


def test_dropped_duplicated_reordered_events_complete_polling_only_for_the_dropped(
        tmp_path: Path, simulator: Any) -> None:
    rows = 150
    report, sim, _ = run_with_webhooks(
        tmp_path, simulator, rows, "--webhook-drop", "0.3", "--webhook-duplicate", "1",
        "--webhook-reorder", "1", poll_interval="0.5")
    assert report["counts"]["complete"] == rows
    sender = sim_json(sim, "/_sim/webhooks")["sender"]
    dropped_endings = sender["droppedTerminal"]
    assert dropped_endings > 10  # the fault is really on
    hooks = report["webhooks"]
    assert hooks["duplicates"] > 0
    # Polls: only rows whose ending was dropped need one, give or take a row
    # whose generation outlasted the learned patience (the stated factor: 2).
    assert report["polls"] <= 2 * dropped_endings + 3, (report["polls"], dropped_endings)
    assert hooks["eventsApplied"] >= rows - 2 * dropped_endings - 3
    stats = sim.stats()
    assert stats["charges"] == rows and stats["extra_charges"] == 0


def test_forged_tampered_replayed_and_stale_deliveries_change_nothing_and_are_counted(
        tmp_path: Path, simulator: Any) -> None:
    rows = 60
    report, sim, ledger = run_with_webhooks(
        tmp_path, simulator, rows, "--webhook-forged", "1", "--webhook-tampered", "1",
        "--webhook-replay", "1", "--webhook-stale", "1", "--webhook-reorder", "1")
    # Every forgery claims the generation failed: none took.
    assert report["counts"] == {"pending": 0, "submitted": 0, "complete": rows, "failed": 0}
    sender = sim_json(sim, "/_sim/webhooks")["sender"]
    refused = report["webhooks"]["refused"]
    assert sender["forged"] > 0 and sender["tampered"] > 0 and sender["staleSent"] > 0
    # Each forged or tampered copy the receiver answered is refused for its
    # signature; each stale copy for its timestamp (copies of the last events
    # may come after the run ended, to nobody); a replay inside the window is
    # a duplicate (half is a safe floor, for the same reason).
    answered = sender["answered"]
    assert answered["forged"] > 0 and answered["tampered"] > 0 and answered["stale"] > 0
    assert refused["badSignature"] == answered["forged"] + answered["tampered"]
    assert refused["staleTimestamp"] == answered["stale"]
    assert report["webhooks"]["duplicates"] >= sender["replayed"] // 2 > 0
    with sqlite3.connect(ledger) as conn:
        kept = conn.execute("SELECT status, disposition FROM ledger_webhook_events").fetchall()
        counts = dict(conn.execute("SELECT name, count FROM ledger_webhook_counts").fetchall())
    assert ("error", "recorded") not in kept
    assert any(disposition == "stale" for _, disposition in kept)
    assert counts["refused.badSignature"] == refused["badSignature"]
    # status shows the same counters
    shown = run_batcher("status", str(ledger), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["webhooks"]["refused.badSignature"] == \
        refused["badSignature"]


# -- SIGKILL while events arrive ---------------------------------------------------------


async def submitted_ledger(path: Path, generations: int) -> None:
    led = SqliteLedger(path)
    await led.open(RunInfo.start("test"))
    try:
        await led.import_rows([
            NewRow(row_id=f"r{i}", line=i + 1, kind=Kind.API_PROJECT, idempotency_key=f"k{i}",
                   model_key="diffio-4.6-flash", api_project_id=f"proj-{i}", sampling={},
                   params={}, request_digest=f"d{i}", group=f"g{i}")
            for i in range(generations)])
        for i in range(generations):
            await led.transition(f"r{i}", Stage.PENDING, Stage.SUBMITTED,
                                 {"generation_id": f"gen-{i}", "api_status": "queued"},
                                 event="submitted")
    finally:
        await led.close(0)


def delivery(generation: int, status: str, second: int) -> tuple[str, bytes]:
    kind = {"processing": "generation.processing", "complete": "generation.completed"}[status]
    event = GenerationEvent.from_payload({
        "eventType": kind, "eventId": f"evt-{generation}-{status}",
        "createdAt": f"2026-01-01T00:00:{second:02d}Z", "apiKeyId": "key_e2e",
        "generationId": f"gen-{generation}", "status": status})
    return f"msg-{generation}-{status}", event.to_json()


async def post_until_killed(url: str, proc: subprocess.Popen[str], generations: int,
                            kill_after: int) -> dict[str, str]:
    """Post events with 8 in flight; SIGKILL the receiver after ``kill_after`` answers."""
    acked: dict[str, str] = {}
    todo = [delivery(g, status, n) for g in range(generations)
            for n, status in enumerate(("processing", "complete"), start=1)]
    todo.reverse()
    killed = asyncio.Event()

    async def worker(session: aiohttp.ClientSession) -> None:
        while todo and not killed.is_set():
            message_id, body = todo.pop()
            headers = signed_headers(SECRET, message_id, int(time.time()), body)
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.json()
                    if resp.status == 200:
                        acked[message_id] = answer["disposition"]
            except (TimeoutError, aiohttp.ClientError):
                return
            if len(acked) >= kill_after and not killed.is_set():
                killed.set()
                os.kill(proc.pid, signal.SIGKILL)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(worker(session) for _ in range(8)))
    return acked


def test_sigkill_while_events_arrive_loses_none_acknowledged(tmp_path: Path) -> None:
    generations = 400
    ledger = tmp_path / "job.ledger.sqlite"
    anyio.run(submitted_ledger, ledger, generations)
    env = batcher_env(BATCHER_WEBHOOK_SECRET=SECRET.reveal())
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "webhooks", "serve", "--ledger", str(ledger),
         "--listen", "127.0.0.1:0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "receiving webhook events on http://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[-1].strip() + "any/path"
        acked = asyncio.run(post_until_killed(url, proc, generations, kill_after=300))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 300
    assert set(acked.values()) <= {"recorded", "stale"}
    with sqlite3.connect(ledger) as conn:
        kept = {mid: disp for mid, disp in conn.execute(
            "SELECT message_id, disposition FROM ledger_webhook_events")}
    missing = {mid for mid in acked if mid not in kept}
    assert not missing, sorted(missing)[:5]
    assert all(kept[mid] == disposition for mid, disposition in acked.items())


# -- several hosts: webhooks serve on a shared ledger ----------------------------------


def test_webhooks_serve_on_postgres_moves_the_rows_of_a_run_in_another_process(
        tmp_path: Path, simulator: Any, pg_schemas: Any) -> None:
    _, url = pg_schemas.new()
    env = batcher_env(**SECRET_ENV)
    serve = subprocess.Popen(
        [sys.executable, "-m", "batcher", "webhooks", "serve", "--ledger", url, "--listen",
         "127.0.0.1:0", "--webhook-secret-env", "E2E_WEBHOOK_SECRET"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert "receiving webhook events on" in line, line + (serve.stderr.read()
                                                              if serve.stderr else "")
        hook_url = line.rsplit(" ", 1)[-1].strip()
        sim = simulator("--auto-create-projects", "--duration", "2,4", "--webhook-url",
                        hook_url + "diffio", "--webhook-secret-env", "E2E_WEBHOOK_SECRET")
        rows = 80
        source = manifest(tmp_path / "m.csv", rows)
        report = tmp_path / "report.json"
        done = run_batcher("run", str(source), "--ledger", url, "--api-base", sim.base_url,
                           "--rate", "50", "--poll-interval", "1", "--webhook-events",
                           "ledger", "--report", str(report), "-q", env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(report.read_text())
        assert result["counts"]["complete"] == rows
        assert result["requests"] / rows <= 1.1, result["requestsByEndpoint"]
        assert result["webhooks"]["eventsApplied"] >= rows - 8
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            out, _ = serve.communicate(timeout=20)
        finally:
            if serve.poll() is None:
                serve.kill()
    assert serve.returncode == 0
    assert "recorded" in out
    shown = run_batcher("status", url, "--json")
    assert json.loads(shown.stdout)["webhooks"]["recorded"] >= 2 * rows

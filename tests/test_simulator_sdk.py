"""The official Diffio SDKs, unchanged, against the simulator running as a
separate process (``python -m batcher.simulator``): 0.1.92 (installed by the
test extra) against the seed API, 0.3.10 against the current API.

The two SDK versions cannot share one environment, so 0.3.10 lives in its own
directory at the repository's root, installed the way CI installs it::

    python -m pip install --upgrade --target .diffio-0.3.10 diffio==0.3.10

and its flow (``sdk_current_flow.py``) runs in a subprocess with that
directory first on PYTHONPATH. Without the directory the test is skipped,
unless BATCHER_REQUIRE_SDK_CURRENT is set (CI sets it), where it fails.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diffio import DiffioApiError, DiffioClient  # type: ignore[import-untyped]

from batcher.simulator import restored_audio

PREFIX = "Diffio simulator listening on "
SDK_CURRENT_DIR = Path(__file__).resolve().parents[1] / ".diffio-0.3.10"
SDK_CURRENT_FLOW = Path(__file__).with_name("sdk_current_flow.py")


class SimProcess:
    """A simulator process; its first stdout line is the base URL."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batcher.simulator", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first.startswith(PREFIX):
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"unexpected first line {first!r}: {err}")
        self.base_url = first[len(PREFIX):].strip()
        self.root = self.base_url.removesuffix("/v1")
        # Drain the rest so a full pipe can never block the server.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.root + path, data=data,
                                         method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def sim() -> Iterator[SimProcess]:
    process = SimProcess("--api", "seed", "--duration", "0.3,0.6", "--seed", "7")
    try:
        yield process
    finally:
        assert process.stop() == 0


def write_wav(path: Path, seconds: float) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(int(seconds * 8000) * 2))
    path.write_bytes(out.getvalue())
    return out.getvalue()


def test_sdk_flow_end_to_end(sim: SimProcess, tmp_path: Path) -> None:
    audio = write_wav(tmp_path / "song.wav", 1.0)
    with DiffioClient(apiKey="sim-key", baseUrl=sim.base_url) as client:
        project = client.create_project(filePath=str(tmp_path / "song.wav"))
        assert project.uploadMethod == "PUT"
        gen = client.create_generation(apiProjectId=project.apiProjectId, model="diffio-3.5",
                                       sampling={"seed": 7}, idempotencyKey="row-1")
        assert gen.status == "queued" and gen.modelKey == "diffio-3.5"
        again = client.create_generation(apiProjectId=project.apiProjectId, model="diffio-3.4",
                                         sampling={"seed": 7}, idempotencyKey="row-1")
        assert again.generationId == gen.generationId and again.idempotentReplay is True
        done = client.wait_for_generation(generationId=gen.generationId,
                                          apiProjectId=project.apiProjectId,
                                          pollInterval=0.1, timeout=20)
        assert done.status == "complete"
        assert done.inference.status == "complete"
        download = client.get_generation_download(generationId=gen.generationId,
                                                  apiProjectId=project.apiProjectId,
                                                  downloadType="audio")
        assert download.mimeType == "audio/mpeg"
        target = tmp_path / "restored.mp3"
        client.generations.download(generationId=gen.generationId,
                                    apiProjectId=project.apiProjectId,
                                    downloadFilePath=str(target))
        assert target.read_bytes() == restored_audio(audio)
        listed = client.list_project_generations(apiProjectId=project.apiProjectId)
        assert [g.generationId for g in listed.generations] == [gen.generationId]
        assert client.list_projects().projects[0].status == "uploaded"

    stats = sim.control("/_sim/stats")
    assert stats["generations_created"] == 1 and stats["generations_replayed"] == 1
    assert stats["charges_by_key"] == {"sim-key": 1}
    assert stats["charged_usd"] == 0.06  # 1 s of WAV, billed as the 60 s minimum
    assert stats["extra_charges"] == 0
    assert stats["signed_url_requests_with_key"] == 0
    assert stats["uploads"] == 1 and stats["downloads"] == 1
    assert stats["requests_by_endpoint"]["upload"] == {"200": 1}


def test_sdk_sees_knobs_changed_at_runtime(sim: SimProcess, tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", 0.1)
    sim.control("/_sim/config", {"api_keys": {"sim-key": {"spend_limit_usd": 0.05}}})
    with DiffioClient(apiKey="sim-key", baseUrl=sim.root) as client:  # base without /v1
        project = client.create_project(filePath=str(tmp_path / "a.wav"))
        with pytest.raises(DiffioApiError) as refused:
            client.create_generation(apiProjectId=project.apiProjectId, model="diffio-2")
        assert refused.value.statusCode == 402
        assert refused.value.responseBody["code"] == "spendLimitExceeded"
        assert refused.value.responseBody["spendLimitUsd"] == 0.05
        sim.control("/_sim/config", {"error_rate": 1.0})
        with pytest.raises(DiffioApiError) as failed:
            client.list_projects()
        assert failed.value.statusCode == 500
    with DiffioClient(apiKey="wrong", baseUrl=sim.base_url) as client, \
            pytest.raises(DiffioApiError) as denied:
        client.list_projects()
    assert denied.value.statusCode == 401
    assert denied.value.responseBody == {"error": "Invalid API key.", "code": "invalidApiKey"}


def test_sigint_stops_the_server_with_status_0() -> None:
    process = SimProcess("--api-key", "k1", "--rate-limit", "5")
    assert process.base_url.startswith("http://127.0.0.1:")
    assert process.base_url.endswith("/v1")
    assert process.control("/_sim/config")["rate_limit"] == 5.0
    assert process.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_bad_settings_exit_2_before_listening(tmp_path: Path) -> None:
    bad = tmp_path / "sim.json"
    bad.write_text('{"error_rate": 3}')
    done = subprocess.run([sys.executable, "-m", "batcher.simulator", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "error_rate" in done.stderr and done.stdout == ""


# -- SDK 0.3.10 against the current API -------------------------------------


def sdk_current_dir() -> Path:
    """Where SDK 0.3.10 is installed; skip (or fail, under CI) when it is not."""
    if (SDK_CURRENT_DIR / "diffio" / "__init__.py").is_file():
        return SDK_CURRENT_DIR
    reason = (f"SDK 0.3.10 is not installed in {SDK_CURRENT_DIR.name}/; run: python -m pip "
              f"install --upgrade --target {SDK_CURRENT_DIR.name} diffio==0.3.10")
    if os.environ.get("BATCHER_REQUIRE_SDK_CURRENT"):
        pytest.fail(reason)
    pytest.skip(reason)


def test_sdk_0310_flow_against_the_current_api(tmp_path: Path) -> None:
    sdk = sdk_current_dir()
    audio = write_wav(tmp_path / "song.wav", 0.6)  # 9644 bytes: 10 parts of 1 KiB
    process = SimProcess("--api", "current", "--part-size", "1K", "--duration", "0.3,0.6",
                         "--seed", "7")
    try:
        path = os.pathsep.join(p for p in (str(sdk), os.environ.get("PYTHONPATH", "")) if p)
        done = subprocess.run(
            [sys.executable, str(SDK_CURRENT_FLOW), process.base_url, str(tmp_path)],
            env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        stats = process.control("/_sim/stats")
    finally:
        assert process.stop() == 0
    seen = json.loads(done.stdout)
    size = len(audio)

    assert seen["version"] == "0.3.10"
    project = seen["project"]
    assert (project["partSizeBytes"], project["maxBytes"]) == (1024, 2 * 1024 ** 3)
    assert project["edgeBaseUrl"] == process.root + "/edge"
    assert project["objectPath"].endswith("/original/song.wav")
    assert project["completion"] == ["uploaded", size] and project["again"] == size

    gen_id, model, status = seen["generation"]
    assert (model, status) == ("diffio-4.6-flash", "queued")
    assert seen["alias"] == [gen_id, "diffio-4.6-flash", True]
    progress = seen["progress"]
    assert progress[-1]["status"] == seen["done"] == "complete"
    assert progress[-1]["stage"] == "complete" and progress[-1]["queue"] is None
    running = [p for p in progress if p["status"] in ("queued", "processing")]
    assert running, progress
    assert all(isinstance(p["queue"]["position"], int) and p["queue"]["message"]
               and set(p["stageProgress"]) == {"preProcessing", "inference"} for p in running)
    assert seen["download"][:2] == ["audio", "audio/mpeg"]
    assert Path(seen["restored"]).read_bytes() == restored_audio(audio)

    assert "diffio-4.6-flash" in seen["retired_refused_locally"]
    retired = seen["retired"]
    assert retired["statusCode"] == 410
    assert retired["body"]["code"] == "model_retired"
    assert retired["body"]["retiredModel"] == "diffio-3.5"
    assert retired["body"]["supportedModels"] == ["diffio-4.6-flash", "diffio-4.6-pro"]
    assert retired["message"] == retired["body"]["error"]

    assert seen["retried_completion"] == size
    failed = seen["failed_upload"]
    assert failed["statusCode"] == 500
    assert failed["body"]["error"]["code"] == "internal_error"
    assert failed["message"] == failed["body"]["error"]["message"]

    assert stats["api_keys_at_upload_host"] == 0
    assert stats["signed_url_requests_with_key"] == 0
    assert (stats["projects_created"], stats["projects_confirmed"]) == (3, 2)
    assert (stats["uploads_completed"], stats["uploads_aborted"]) == (2, 1)
    assert stats["parts_received"] == 20 and stats["part_errors_injected"] >= 2
    assert stats["requests_by_endpoint"]["edge:abort"] == {"200": 1}
    assert (stats["generations_created"], stats["charges"], stats["extra_charges"]) == (1, 1, 0)
    assert stats["retired_model_refusals"] == 1
    assert stats["downloads"] == 1
    assert list(stats["user_agents"]) == ["diffio-python/0.3.10"]

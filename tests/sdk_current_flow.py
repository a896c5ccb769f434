"""The official Diffio SDK 0.3.10's own flow against a simulator serving the current API.

Not a test module: ``test_simulator_sdk.py`` runs it in a subprocess whose
PYTHONPATH starts with the directory SDK 0.3.10 was installed into (it cannot
share an environment with the 0.1.92 the test extra installs), as::

    python tests/sdk_current_flow.py BASE_URL WORKDIR

It imports only the SDK and the standard library, drives the simulator
(``/_sim/config`` between steps), and prints one JSON object of what it
observed for the test to check.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import diffio
from diffio import DiffioApiError, DiffioClient, RequestOptions


def configure(root: str, patch: dict[str, Any]) -> None:
    request = urllib.request.Request(root + "/_sim/config", data=json.dumps(patch).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()


def api_error(exc: DiffioApiError) -> dict[str, Any]:
    return {"statusCode": exc.statusCode, "message": exc.message, "body": exc.responseBody}


def main(base_url: str, workdir: Path) -> dict[str, Any]:
    root = base_url.removesuffix("/v1")
    seen: dict[str, Any] = {"version": diffio.__version__}
    source = workdir / "song.wav"
    with DiffioClient(apiKey="sim-key", baseUrl=base_url) as client:
        project = client.create_project(filePath=str(source))
        seen["project"] = {
            "partSizeBytes": project.upload.partSizeBytes,
            "maxBytes": project.upload.maxBytes,
            "edgeBaseUrl": project.upload.edgeBaseUrl,
            "objectPath": project.objectPath,
            "completion": [project.uploadCompletion.status, project.uploadCompletion.sizeBytes],
            "again": client.complete_project_upload(apiProjectId=project.apiProjectId).sizeBytes,
        }
        gen = client.create_generation(apiProjectId=project.apiProjectId, idempotencyKey="row-1",
                                       sampling={"seed": 7})
        alias = client.create_generation(apiProjectId=project.apiProjectId, idempotencyKey="row-1",
                                         sampling={"seed": 7}, model="diffio-4.5-flash")
        seen["generation"] = [gen.generationId, gen.modelKey, gen.status]
        seen["alias"] = [alias.generationId, alias.modelKey, alias.idempotentReplay]
        progress: list[dict[str, Any]] = []
        done = client.wait_for_generation(
            generationId=gen.generationId, apiProjectId=project.apiProjectId, pollInterval=0.1,
            timeout=30,
            onProgress=lambda p: progress.append(
                {"status": p.status, "stage": p.stage, "stageProgress": p.stageProgress,
                 "queue": p.queue, "inference": p.inference.status}),
        )
        seen["progress"] = progress
        seen["done"] = done.status
        download = client.get_generation_download(generationId=gen.generationId,
                                                  apiProjectId=project.apiProjectId)
        seen["download"] = [download.downloadType, download.mimeType,
                            hasattr(download, "bucket")]
        target = workdir / "restored.mp3"
        client.generations.download(generationId=gen.generationId,
                                    apiProjectId=project.apiProjectId,
                                    downloadFilePath=str(target))
        seen["restored"] = str(target)

        try:
            client.create_generation(apiProjectId=project.apiProjectId, model="diffio-3.5")
        except ValueError as exc:
            seen["retired_refused_locally"] = str(exc)
        # The SDK will not send a retired model; its own request path shows how
        # the API's 410 surfaces to its callers.
        try:
            client._request("POST", "diffio-3.5-generation",
                            json_payload={"apiProjectId": project.apiProjectId})
        except DiffioApiError as exc:
            seen["retired"] = api_error(exc)

        # A part that fails is retried on its own; the upload still lands.
        configure(root, {"part_error_rate": 0.5, "seed": 11})
        retried = client.create_project(
            filePath=str(source), requestOptions=RequestOptions(maxRetries=6, retryBackoff=0))
        seen["retried_completion"] = retried.uploadCompletion.sizeBytes
        # A part that keeps failing makes the SDK abort the upload.
        configure(root, {"part_error_rate": 1.0})
        try:
            client.create_project(filePath=str(source))
        except DiffioApiError as exc:
            seen["failed_upload"] = api_error(exc)
        configure(root, {"part_error_rate": 0.0})
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))

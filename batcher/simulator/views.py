"""The JSON shapes of the simulator's 200 answers, per API generation.

The seed's shapes are field for field those the SDK 0.1.92 parser indexes
directly, so every field it requires is always present. The current API
(SDK 0.3.10) answers create_project with an upload session instead of a
signed URL, adds ``stage``, ``stageProgress`` and ``queue`` to progress, and
drops ``bucket`` from downloads.
"""

from __future__ import annotations

from typing import Any

from batcher.simulator.catalog import ApiGeneration
from batcher.simulator.model import Generation, Phase, Project
from batcher.simulator.state import iso
from batcher.simulator.uploads import UploadSession

__all__ = [
    "BUCKET",
    "download_body",
    "generation_body",
    "generation_summary",
    "object_path",
    "progress_body",
    "project_created_body",
    "project_session_body",
    "project_summary",
]

BUCKET = "diffio_api"


def object_path(user: str, project: Project) -> str:
    """Where the original upload lives in the (simulated) bucket."""
    return f"users/{user}/projects/{project.api_project_id}/original/{project.file_name}"


def project_created_body(
    project: Project, *, user: str, upload_url: str, expires_wall: float
) -> dict[str, Any]:
    """create_project's answer: all six fields the SDK requires."""
    return {
        "apiProjectId": project.api_project_id,
        "uploadUrl": upload_url,
        "uploadMethod": "PUT",
        "objectPath": object_path(user, project),
        "bucket": BUCKET,
        "expiresAt": iso(expires_wall),
    }


def project_session_body(
    project: Project, session: UploadSession, *, edge_base_url: str, expires_wall: float
) -> dict[str, Any]:
    """The current API's create_project answer: the project and its upload session."""
    expires = iso(expires_wall)
    return {
        "apiProjectId": project.api_project_id,
        "objectPath": session.object_key,
        "expiresAt": expires,
        "upload": {
            "uploadSessionId": session.session_id,
            "edgeBaseUrl": edge_base_url,
            "uploadToken": session.token,
            "objectKey": session.object_key,
            "partSizeBytes": session.part_size,
            "maxBytes": session.max_bytes,
            "expiresAt": expires,
        },
    }


def generation_body(gen: Generation, phase: Phase, *, replay: bool) -> dict[str, Any]:
    """A generation endpoint's answer; a replay carries the current status."""
    body: dict[str, Any] = {
        "generationId": gen.generation_id,
        "apiProjectId": gen.api_project_id,
        "modelKey": gen.model_key,
        "status": phase.status,
    }
    if replay:
        body["idempotentReplay"] = True
    return body


def progress_body(
    gen: Generation, phase: Phase, *, api: ApiGeneration, queue_ahead: int
) -> dict[str, Any]:
    """get_generation_progress's answer; both stage objects always present.

    The current API adds ``stage``; while the generation is queued or
    processing also ``stageProgress`` (percent per stage) and ``queue``
    (``position``: 1 is next, 0 once out of the queue; ``message``).
    """
    body: dict[str, Any] = {
        "generationId": gen.generation_id,
        "apiProjectId": gen.api_project_id,
        "status": phase.status,
        "hasVideo": False,
        "preProcessing": phase.stages["preProcessing"],
        "inference": phase.stages["inference"],
        "error": phase.error,
        "errorDetails": phase.error_details,
    }
    if api == "seed":
        return body
    running = [name for name, stage in phase.stages.items() if stage["status"] == "running"]
    body["stage"] = running[0] if running else phase.status
    if phase.status in ("queued", "processing"):
        body["stageProgress"] = {name: stage["progress"] for name, stage in phase.stages.items()}
        message = (f"Waiting for a worker: position {queue_ahead} in the queue"
                   if queue_ahead else "Out of the queue; processing")
        body["queue"] = {"position": queue_ahead, "message": message}
    return body


def download_body(
    gen: Generation, project: Project, *, user: str, download_url: str, api: ApiGeneration
) -> dict[str, Any]:
    """get_generation_download's answer, audio as MP3.

    The seed's has all eight fields; the current API's drops ``bucket``.
    """
    body = {
        "generationId": gen.generation_id,
        "apiProjectId": gen.api_project_id,
        "downloadType": "audio",
        "downloadUrl": download_url,
        # The seed's example keeps the source name even though the bytes are MP3.
        "fileName": project.file_name,
        "storagePath": (
            f"users/{user}/projects/{project.api_project_id}"
            f"/generations/{gen.generation_id}/restored.mp3"
        ),
        "bucket": BUCKET,
        "mimeType": "audio/mpeg",
    }
    if api == "current":
        del body["bucket"]
    return body


def project_summary(project: Project) -> dict[str, Any]:
    """One entry of list_projects."""
    return {
        "apiProjectId": project.api_project_id,
        "status": project.status,
        "originalFileName": project.file_name,
        "contentType": project.content_type,
        "hasVideo": False,
        "generationCount": len(project.generation_ids),
        "createdAt": iso(project.created_wall),
        "updatedAt": iso(project.updated_wall),
    }


def generation_summary(gen: Generation, phase: Phase, elapsed: float) -> dict[str, Any]:
    """One entry of list_project_generations."""
    moved = phase.ended_after if phase.ended_after is not None else elapsed
    return {
        "generationId": gen.generation_id,
        "status": phase.status,
        "modelKey": gen.model_key,
        "progress": phase.progress,
        "createdAt": iso(gen.created_wall),
        "updatedAt": iso(gen.created_wall + max(0.0, moved)),
    }

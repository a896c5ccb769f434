"""The simulator serving the current API over real HTTP: 4.6 models and their
aliases, 410 for retired models, create_project's upload session,
complete_project_upload and UPLOAD_MISSING, progress and download shapes,
and a live switch between API generations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sim_harness import KEY, Harness, serve

from batcher.simulator import CURRENT_MODELS, SimConfig, api_for_model, restored_audio, run_config


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio

FLASH = "diffio-4.6-flash"


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with serve(SimConfig(duration=(10.0, 10.0))) as harness:
        yield harness


# -- models ----------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    ["diffio-3.5", "diffio-3.4", "diffio-2.0", "diffio-2.0-flash", "diffio-2", "diffio-4.0-flash"],
)
async def test_every_retired_model_is_410_with_every_field_and_charges_nothing(
    h: Harness, model: str
) -> None:
    pid = await h.confirmed_project()
    reply = await h.generate(pid, model, idempotencyKey="row-1")
    assert reply.status == 410
    assert reply.body == {
        "error": reply.body["error"],
        "code": "model_retired",
        "retiredModel": model,
        "supportedModels": ["diffio-4.6-flash", "diffio-4.6-pro"],
    }
    assert model in reply.body["error"] and "diffio-4.6-flash" in reply.body["error"]
    assert reply.headers["Content-Type"].startswith("application/json")
    stats = h.sim.stats
    assert (stats.retired_model_refusals, stats.generations_created, stats.charges) == (1, 0, 0)
    assert stats.status_count(f"{model}-generation", 410) == 1


async def test_a_retired_model_still_needs_a_valid_key(h: Harness) -> None:
    reply = await h.call("diffio-3.5-generation", {"apiProjectId": "p"}, key="wrong")
    assert reply.status == 401
    assert h.sim.stats.retired_model_refusals == 0


async def test_unknown_names_that_are_not_model_endpoints_stay_404(h: Harness) -> None:
    for path in ("generation", "foo-generation", "webhooks/send_test_event"):
        assert (await h.call(path, {})).status == 404, path


@pytest.mark.parametrize(("alias", "target"), [("diffio-4.5-flash", "diffio-4.6-flash"),
                                               ("diffio-4.5-pro", "diffio-4.6-pro")])
async def test_45_names_are_aliases_one_generation_no_conflict(
    h: Harness, alias: str, target: str
) -> None:
    pid = await h.confirmed_project()
    first = await h.generate(pid, alias, idempotencyKey="row-1")
    assert first.status == 200 and first.body["modelKey"] == target
    again = await h.generate(pid, target, idempotencyKey="row-1")
    assert again.status == 200
    assert again.body["generationId"] == first.body["generationId"]
    assert again.body["idempotentReplay"] is True
    assert (h.sim.stats.generations_created, h.sim.stats.charges) == (1, 1)


async def test_flash_and_pro_with_one_key_conflict(h: Harness) -> None:
    pid = await h.confirmed_project()
    assert (await h.generate(pid, FLASH, idempotencyKey="k")).status == 200
    conflict = await h.generate(pid, "diffio-4.6-pro", idempotencyKey="k")
    assert conflict.status == 409 and conflict.body["code"] == "idempotencyKeyConflict"


async def test_the_seed_knows_no_46_models_nor_complete_project_upload() -> None:
    async with serve(SimConfig(api="seed")) as h:
        h.sim.add_project(KEY, "p1")
        for endpoint in (f"{FLASH}-generation", "complete_project_upload"):
            reply = await h.call(endpoint, {"apiProjectId": "p1"})
            assert reply.status == 404, endpoint
        assert (await h.generate("p1", "diffio-3.4")).body["modelKey"] == "diffio-3.5"


# -- create_project and confirmation ----------------------------------------


async def test_create_project_answers_an_upload_session_and_no_upload_url(h: Harness) -> None:
    created = await h.session(10)
    assert set(created) == {"apiProjectId", "objectPath", "expiresAt", "upload"}
    upload = created["upload"]
    assert set(upload) == {"uploadSessionId", "edgeBaseUrl", "uploadToken", "objectKey",
                           "partSizeBytes", "maxBytes", "expiresAt"}
    assert upload["edgeBaseUrl"] == h.root + "/edge"
    assert (upload["partSizeBytes"], upload["maxBytes"]) == (32 * 1024 * 1024, 2 * 1024 ** 3)
    assert upload["objectKey"] == created["objectPath"]
    assert created["objectPath"].endswith("/original/a.wav")
    assert upload["expiresAt"] == created["expiresAt"] == "2026-09-21T15:13:20Z"  # WALL0 + 1 h
    assert KEY not in upload["uploadToken"]
    other = await h.session(10)
    assert other["upload"]["uploadToken"] != upload["uploadToken"]
    listed = (await h.call("list_projects", {})).body["projects"]
    assert [p["status"] for p in listed] == ["uploading", "uploading"]


async def test_create_project_refuses_a_file_over_max_bytes_before_anything_exists() -> None:
    async with serve(SimConfig(max_upload_bytes=100)) as h:
        reply = await h.call("create_project", {"fileName": "big.wav", "contentLength": 101})
        assert reply.status == 413
        assert reply.body["code"] == "UPLOAD_TOO_LARGE"
        assert h.sim.stats.projects_created == 0
        assert (await h.call("create_project", {"fileName": "ok.wav",
                                                "contentLength": 100})).status == 200


async def test_upload_missing_before_completion_and_after_abort_then_confirmed_once(
    h: Harness,
) -> None:
    created = await h.session(4)
    pid, upload = created["apiProjectId"], created["upload"]
    body = {"apiProjectId": pid}
    missing = await h.call("complete_project_upload", body)
    assert missing.status == 409
    assert missing.body == {"error": "Upload has not completed yet.", "code": "UPLOAD_MISSING"}

    started = (await h.edge(upload, "POST", "start")).body["uploadId"]
    receipts = await h.put_parts(upload, started, b"ABCD", 4)
    assert (await h.edge(upload, "POST", "abort", body={"uploadId": started})).status == 200
    assert (await h.call("complete_project_upload", body)).body["code"] == "UPLOAD_MISSING"
    after_abort = await h.edge(upload, "POST", "complete",
                               body={"uploadId": started, "parts": receipts})
    assert after_abort.status == 404 and after_abort.body["error"]["code"] == "no_such_upload"

    await h.upload(created, b"ABCD")
    for _ in range(3):  # idempotent
        done = await h.call("complete_project_upload", body)
        assert done.status == 200
        assert done.body == {"apiProjectId": pid, "status": "uploaded", "sizeBytes": 4}
    stats = h.sim.stats
    assert (stats.complete_project_upload_calls, stats.projects_confirmed) == (5, 1)
    assert (stats.uploads_started, stats.uploads_aborted, stats.uploads_completed) == (2, 1, 1)
    listed = (await h.call("list_projects", {})).body["projects"]
    assert listed[0]["status"] == "uploaded"


async def test_complete_project_upload_checks_key_and_project(h: Harness) -> None:
    pid = await h.confirmed_project()
    assert (await h.call("complete_project_upload", {"apiProjectId": 3})).status == 400
    assert (await h.call("complete_project_upload", {"apiProjectId": "nope"})).status == 404
    h.sim.update_config(api_keys={"k2": {}})
    other = await h.call("complete_project_upload", {"apiProjectId": pid}, key="k2")
    assert other.status == 403


async def test_a_generation_on_an_unconfirmed_upload_is_409_and_charges_nothing(
    h: Harness,
) -> None:
    created = await h.session(4)
    pid = created["apiProjectId"]
    refused = await h.generate(pid, FLASH, idempotencyKey="row-1")
    assert refused.status == 409
    assert refused.body["code"] == "UPLOAD_MISSING"
    await h.upload(created, b"ABCD")  # uploaded, not yet confirmed
    assert (await h.generate(pid, FLASH, idempotencyKey="row-1")).status == 409
    stats = h.sim.stats
    assert (stats.generations_upload_missing, stats.charges, stats.generations_created) == (2, 0, 0)
    await h.call("complete_project_upload", {"apiProjectId": pid})
    accepted = await h.generate(pid, FLASH, idempotencyKey="row-1")
    assert accepted.status == 200 and accepted.body["status"] == "queued"
    assert h.sim.stats.generations_without_upload == 0


async def test_projects_that_exist_already_need_no_confirmation(h: Harness) -> None:
    h.sim.add_project(KEY, "given")
    assert (await h.generate("given", FLASH)).status == 200
    done = await h.call("complete_project_upload", {"apiProjectId": "given"})
    assert done.status == 200 and done.body["status"] == "uploaded"
    h.sim.update_config(auto_create_projects=True)
    assert (await h.generate("fresh", "diffio-4.6-pro")).status == 200


# -- progress and download --------------------------------------------------


async def test_progress_adds_stage_stage_progress_and_queue_while_running(h: Harness) -> None:
    pids = [await h.confirmed_project(bytes([n]) * 3) for n in range(3)]
    gids = [(await h.generate(pid, FLASH)).body["generationId"] for pid in pids]

    async def progress(gid: str) -> dict[str, object]:
        reply = await h.call("get_generation_progress", {"generationId": gid})
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("application/json")
        body: dict[str, object] = reply.body
        return body

    queued = [await progress(gid) for gid in gids]
    assert [q["queue"]["position"] for q in queued] == [1, 2, 3]  # type: ignore[index]
    assert queued[2]["stage"] == "queued"
    assert queued[2]["stageProgress"] == {"preProcessing": 0, "inference": 0}
    assert "position 3" in queued[2]["queue"]["message"]  # type: ignore[index]
    await h.clock.advance_to(h.clock.now() + 0.5)  # half of the 1 s in the queue
    assert (await progress(gids[2]))["queue"] == {
        "position": 2, "message": "Waiting for a worker: position 2 in the queue"}
    await h.clock.advance_to(h.clock.now() + 1.5)  # 20 %: preprocessing half done
    running = await progress(gids[2])
    assert running["status"] == "processing" and running["stage"] == "preProcessing"
    assert running["stageProgress"] == {"preProcessing": 50, "inference": 0}
    assert running["queue"]["position"] == 0  # type: ignore[index]
    await h.clock.advance_to(h.clock.now() + 4.5)  # 65 %
    assert (await progress(gids[2]))["stage"] == "inference"
    await h.clock.advance_to(h.clock.now() + 10)
    done = await progress(gids[2])
    assert done["status"] == "complete" and done["stage"] == "complete"
    assert "stageProgress" not in done and "queue" not in done
    assert {"preProcessing", "inference", "hasVideo", "error"} <= set(done)


async def test_failed_generations_report_stage_failed() -> None:
    async with serve(SimConfig(duration=(10.0, 10.0), failure_rate=1.0)) as h:
        gid = (await h.generate(await h.confirmed_project(), FLASH)).body["generationId"]
        await h.clock.advance_to(h.clock.now() + 10)
        body = (await h.call("get_generation_progress", {"generationId": gid})).body
        assert body["status"] == "failed" and body["stage"] == "failed"
        assert body["error"] and "queue" not in body


async def test_download_drops_bucket_and_lasts_six_hours(h: Harness) -> None:
    pid = await h.confirmed_project(b"payload")
    gid = (await h.generate(pid, FLASH)).body["generationId"]
    await h.clock.advance_to(h.clock.now() + 10)
    body = {"generationId": gid, "apiProjectId": pid}
    download = await h.call("get_generation_download", body)
    assert download.status == 200
    assert "bucket" not in download.body
    assert download.body["mimeType"] == "audio/mpeg"
    url = download.body["downloadUrl"]
    await h.wall.advance_to(h.wall.now() + 6 * 3600 - 1)
    async with h.http.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == restored_audio(b"payload")
    await h.wall.advance_to(h.wall.now() + 2)
    async with h.http.get(url) as resp:
        assert resp.status == 410
    assert h.sim.stats.signed_url_requests_with_key == 0


# -- switching generations --------------------------------------------------


async def test_generations_of_retired_models_stay_pollable_and_downloadable() -> None:
    async with serve(SimConfig(api="seed", duration=(10.0, 10.0))) as h:
        pid = await h.project(b"old audio")
        gid = (await h.generate(pid, "diffio-3.5", idempotencyKey="row-1")).body["generationId"]
        h.sim.update_config(api="current")
        await h.clock.advance_to(h.clock.now() + 10)
        body = {"generationId": gid, "apiProjectId": pid}
        progress = await h.call("get_generation_progress", body)
        assert progress.status == 200 and progress.body["status"] == "complete"
        listed = (await h.call("list_project_generations", {"apiProjectId": pid})).body
        assert listed["generations"][0]["modelKey"] == "diffio-3.5"
        url = (await h.call("get_generation_download", body)).body["downloadUrl"]
        async with h.http.get(url) as resp:
            assert await resp.read() == restored_audio(b"old audio")
        # The same row again is now a 410: the old model is gone.
        again = await h.generate(pid, "diffio-3.5", idempotencyKey="row-1")
        assert again.status == 410
        # The seed's uploaded project is ready for the new models.
        assert (await h.generate(pid, FLASH, idempotencyKey="row-2")).status == 200


async def test_switching_through_the_control_endpoint(h: Harness) -> None:
    async with h.http.post(f"{h.root}/_sim/config", json={"api": "seed"}) as resp:
        assert resp.status == 200 and (await resp.json())["api"] == "seed"
    assert "uploadUrl" in (await h.call("create_project", {"fileName": "a.wav"})).body
    async with h.http.post(f"{h.root}/_sim/config", json={"api": "v3"}) as resp:
        assert resp.status == 400


# -- headers ----------------------------------------------------------------


async def test_user_agents_are_counted_by_value_everywhere_but_control(h: Harness) -> None:
    created = await h.session(2)
    async with h.http.post(f"{h.base}/list_projects", json={},
                           headers={"Authorization": f"Bearer {KEY}",
                                    "User-Agent": "batcher/9.9"}) as resp:
        assert resp.status == 200
    await h.edge(created["upload"], "POST", "start", headers={"User-Agent": "batcher/9.9"})
    async with h.http.get(f"{h.root}/_sim/stats", headers={"User-Agent": "curl/8"}):
        pass
    agents = h.sim.stats.user_agents
    assert agents["batcher/9.9"] == 2
    assert "curl/8" not in agents
    assert sum(agents.values()) == 3  # create_project with aiohttp's own agent


# -- which generation serves a model ----------------------------------------


@pytest.mark.parametrize(
    ("model", "api"),
    [("diffio-4.6-flash", "current"), ("diffio-4.6-pro", "current"),
     ("diffio-4.5-flash", "current"), ("diffio-4.0-pro", "current"), ("Diffio-5", "current"),
     ("diffio-3.5", "seed"), ("diffio-3.4", "seed"), ("diffio-2", "seed"),
     ("diffio-2.0-flash", "seed"), ("not-a-model", "current")],
)
async def test_api_for_model(model: str, api: str) -> None:
    assert api_for_model(model) == api


async def test_run_config_takes_a_config_a_mapping_or_nothing() -> None:
    assert run_config(None, "diffio-3.5").api == "seed"
    assert run_config(SimConfig(duration=(0, 0)), FLASH) == SimConfig(duration=(0, 0))
    from_file = run_config({"duration": 0.5, "api": "seed"}, CURRENT_MODELS[1])
    assert (from_file.api, from_file.duration) == ("current", (0.5, 0.5))

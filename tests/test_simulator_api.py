"""The simulator serving the seed API over real HTTP: every return code of the seed's
table, every idempotency case, progress over (fake) time, billing and the
signed storage URLs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sim_harness import KEY, Harness, serve, wav_bytes

from batcher.simulator import KeySpec, SimConfig, derived_generation_id, restored_audio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio



@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with serve(SimConfig(api="seed", duration=(10.0, 10.0))) as harness:
        yield harness


# -- 200 / 204 / 405 / 404 -------------------------------------------------

ENDPOINTS = [
    "create_project",
    "diffio-3.5-generation",
    "diffio-3.4-generation",
    "diffio-2.0-generation",
    "diffio-2.0-flash-generation",
    "get_generation_progress",
    "get_generation_download",
    "list_projects",
    "list_project_generations",
]


async def test_options_is_204_on_every_endpoint_without_a_key(h: Harness) -> None:
    for endpoint in ENDPOINTS:
        reply = await h.call(endpoint, key=None, method="OPTIONS")
        assert reply.status == 204, endpoint
        assert "POST" in reply.headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405_with_a_json_error(h: Harness, method: str) -> None:
    reply = await h.call("list_projects", key=None, method=method)
    assert reply.status == 405
    assert reply.body == {"error": "Method not allowed.", "code": "methodNotAllowed"}
    assert reply.headers["Allow"] == "POST, OPTIONS"


async def test_unknown_paths_are_404(h: Harness) -> None:
    for path in ("diffio-4.0-generation", "webhooks/send_test_event", ""):
        reply = await h.call(path, {})
        assert reply.status == 404, path
        assert reply.body["code"] == "notFound"
    assert h.sim.stats.status_count("unknown", 404) == 3


async def test_the_whole_happy_path_answers_every_field(h: Harness) -> None:
    created = await h.call("create_project", {"fileName": "song.wav", "contentType": "audio/wav",
                                              "contentLength": 4})
    assert created.status == 200
    assert set(created.body) == {"apiProjectId", "uploadUrl", "uploadMethod", "objectPath",
                                 "bucket", "expiresAt"}
    assert created.body["uploadMethod"] == "PUT"
    assert "/v1/" not in created.body["uploadUrl"]
    assert created.body["objectPath"].endswith("/original/song.wav")
    assert created.body["expiresAt"] == "2026-09-21T15:13:20Z"  # WALL0 + 3600
    pid = created.body["apiProjectId"]
    async with h.http.put(created.body["uploadUrl"], data=b"RAW!") as resp:
        assert resp.status == 200

    gen = await h.generate(pid)
    assert gen.status == 200
    assert gen.body == {"generationId": gen.body["generationId"], "apiProjectId": pid,
                        "modelKey": "diffio-3.5", "status": "queued"}
    gid = gen.body["generationId"]

    listed = await h.call("list_projects", {})
    assert listed.body["projects"] == [{
        "apiProjectId": pid, "status": "uploaded", "originalFileName": "song.wav",
        "contentType": "audio/wav", "hasVideo": False, "generationCount": 1,
        "createdAt": "2026-09-21T14:13:20Z", "updatedAt": "2026-09-21T14:13:20Z"}]
    gens = await h.call("list_project_generations", {"apiProjectId": pid})
    assert gens.body["apiProjectId"] == pid
    assert [(g["generationId"], g["status"], g["modelKey"]) for g in gens.body["generations"]] == [
        (gid, "queued", "diffio-3.5")]

    await h.clock.advance_to(h.clock.now() + 10.0)
    progress = await h.call("get_generation_progress", {"generationId": gid, "apiProjectId": pid})
    assert progress.status == 200
    assert progress.body["status"] == "complete"
    assert progress.body["hasVideo"] is False
    assert progress.body["preProcessing"]["status"] == "complete"
    assert progress.body["inference"]["jobState"] == "SUCCEEDED"

    download = await h.call("get_generation_download", {"generationId": gid, "apiProjectId": pid})
    assert download.status == 200
    assert set(download.body) == {"generationId", "apiProjectId", "downloadType", "downloadUrl",
                                  "fileName", "storagePath", "bucket", "mimeType"}
    assert download.body["downloadType"] == "audio"
    assert download.body["mimeType"] == "audio/mpeg"
    assert download.body["storagePath"].endswith(f"/generations/{gid}/restored.mp3")
    async with h.http.get(download.body["downloadUrl"]) as resp:
        assert resp.status == 200
        assert await resp.read() == restored_audio(b"RAW!")
    stats = h.sim.stats
    assert (stats.uploads, stats.downloads, stats.signed_url_requests_with_key) == (1, 1, 0)


# -- 400 -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"apiProjectId": 7}, "invalidApiProjectId"),
        ({}, "invalidApiProjectId"),
        ({"apiProjectId": "p", "sampling": [1]}, "invalidSampling"),
        ({"apiProjectId": "p", "sampling": "seed=1"}, "invalidSampling"),
        ({"apiProjectId": "p", "params": 3}, "invalidParams"),
        ({"apiProjectId": "p", "idempotencyKey": 5}, "invalidIdempotencyKey"),
        ({"apiProjectId": "p", "idempotencyKey": "   "}, "invalidIdempotencyKey"),
        ({"apiProjectId": "p", "idempotencyKey": "k" * 256}, "invalidIdempotencyKey"),
    ],
)
async def test_each_400_condition_of_the_generation_endpoint(
    h: Harness, fields: dict[str, Any], code: str
) -> None:
    # "p" does not exist: validation must win over the 404.
    reply = await h.call("diffio-3.5-generation", fields)
    assert reply.status == 400
    assert reply.body["code"] == code
    assert isinstance(reply.body["error"], str)
    assert h.sim.stats.generations_created == 0


async def test_invalid_json_is_400_and_comes_after_auth(h: Harness) -> None:
    reply = await h.call("diffio-3.5-generation", raw=b"{not json")
    assert (reply.status, reply.body["code"]) == (400, "invalidJson")
    reply = await h.call("list_projects", raw=b"[1, 2]")
    assert (reply.status, reply.body["code"]) == (400, "invalidJson")
    reply = await h.call("diffio-3.5-generation", raw=b"{not json", key=None)
    assert reply.status == 401


async def test_key_limits_are_checked_after_trimming(h: Harness) -> None:
    pid = await h.project()
    padded = "  " + "k" * 255 + "  "
    assert (await h.generate(pid, idempotencyKey=padded)).status == 200
    assert (await h.generate(pid, idempotencyKey="x")).status == 200


async def test_null_sampling_and_params_mean_empty_objects(h: Harness) -> None:
    pid = await h.project()
    first = await h.generate(pid, sampling=None, params=None)
    second = await h.generate(pid, sampling={}, params={})
    assert (first.status, second.status) == (200, 200)
    stats = h.sim.stats
    # One logical request, paid twice (no idempotency key): the second is "extra".
    assert list(stats.charges_by_request.values()) == [2]
    assert stats.extra_charges == 1


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, "invalidFileName"),
        ({"fileName": 3}, "invalidFileName"),
        ({"fileName": "a.wav", "contentLength": -1}, "invalidContentLength"),
        ({"fileName": "a.wav", "contentLength": "12"}, "invalidContentLength"),
        ({"fileName": "a.wav", "contentLength": True}, "invalidContentLength"),
        ({"fileName": "a.wav", "params": []}, "invalidParams"),
    ],
)
async def test_create_project_400s(h: Harness, fields: dict[str, Any], code: str) -> None:
    reply = await h.call("create_project", fields)
    assert (reply.status, reply.body["code"]) == (400, code)
    assert h.sim.stats.projects_created == 0


async def test_read_endpoints_validate_their_ids(h: Harness) -> None:
    reply = await h.call("get_generation_progress", {"generationId": 1})
    assert (reply.status, reply.body["code"]) == (400, "invalidGenerationId")
    reply = await h.call("get_generation_download", {"generationId": "g"})
    assert (reply.status, reply.body["code"]) == (400, "invalidApiProjectId")
    reply = await h.call("get_generation_download",
                         {"generationId": "g", "apiProjectId": "p", "downloadType": "flac"})
    assert (reply.status, reply.body["code"]) == (400, "invalidDownloadType")
    reply = await h.call("list_project_generations", {"apiProjectId": None})
    assert (reply.status, reply.body["code"]) == (400, "invalidApiProjectId")


# -- 401 / 403 -------------------------------------------------------------

@pytest.mark.parametrize("header", ["Authorization", "X-Api-Key", "Xi-Api-Key"])
async def test_every_auth_header_works_and_a_wrong_key_is_401(h: Harness, header: str) -> None:
    assert (await h.call("list_projects", {}, header=header)).status == 200
    reply = await h.call("list_projects", {}, key="nope", header=header)
    assert (reply.status, reply.body["error"]) == (401, "Invalid API key.")


async def test_missing_key_is_401(h: Harness) -> None:
    reply = await h.call("list_projects", {}, key=None)
    assert reply.status == 401
    assert reply.body == {"error": "Invalid API key.", "code": "invalidApiKey"}
    async with h.http.post(f"{h.base}/list_projects", json={},
                           headers={"Authorization": "Basic c2ltLWtleQ=="}) as resp:
        assert resp.status == 401


async def test_inactive_key_and_missing_permissions_are_403(h: Harness) -> None:
    h.sim.set_key("off", KeySpec(active=False))
    h.sim.set_key("ro", KeySpec(write=False))
    h.sim.set_key("wo", KeySpec(read=False))
    pid = await h.project()
    reply = await h.call("list_projects", {}, key="off")
    assert (reply.status, reply.body["code"]) == (403, "apiKeyInactive")
    reply = await h.call("diffio-3.5-generation", {"apiProjectId": pid}, key="ro")
    assert (reply.status, reply.body["code"]) == (403, "permissionDenied")
    reply = await h.call("create_project", {"fileName": "a.wav"}, key="ro")
    assert reply.status == 403
    assert (await h.call("list_projects", {}, key="ro")).status == 200
    reply = await h.call("get_generation_progress", {"generationId": "g"}, key="wo")
    assert (reply.status, reply.body["code"]) == (403, "permissionDenied")
    assert (await h.call("create_project", {"fileName": "a.wav"}, key="wo")).status == 200


async def test_another_keys_project_or_generation_is_403(h: Harness) -> None:
    h.sim.set_key("other", KeySpec())
    pid = await h.project()
    gid = (await h.generate(pid)).body["generationId"]
    for endpoint, body in [
        ("diffio-3.5-generation", {"apiProjectId": pid}),
        ("list_project_generations", {"apiProjectId": pid}),
        ("get_generation_progress", {"generationId": gid}),
        ("get_generation_download", {"generationId": gid, "apiProjectId": pid}),
    ]:
        reply = await h.call(endpoint, body, key="other")
        assert reply.status == 403, endpoint
        assert "does not own the project" in reply.body["error"]
    assert (await h.call("list_projects", {}, key="other")).body == {"projects": []}
    assert h.sim.stats.generations_created == 1


# -- 404 -------------------------------------------------------------------

async def test_unknown_project_and_generation_are_404(h: Harness) -> None:
    pid = await h.project()
    reply = await h.generate("proj-nope")
    assert (reply.status, reply.body["error"]) == (404, "API project not found.")
    reply = await h.call("get_generation_progress", {"generationId": "gen-nope"})
    assert (reply.status, reply.body["error"]) == (404, "Generation not found.")
    gid = (await h.generate(pid)).body["generationId"]
    other = await h.project()
    reply = await h.call("get_generation_progress", {"generationId": gid, "apiProjectId": other})
    assert reply.status == 404
    reply = await h.call("list_project_generations", {"apiProjectId": "proj-nope"})
    assert reply.status == 404


async def test_auto_created_projects_belong_to_the_caller(h: Harness) -> None:
    h.sim.update_config(auto_create_projects=True)
    reply = await h.generate("row-project-1")
    assert (reply.status, reply.body["apiProjectId"]) == (200, "row-project-1")
    h.sim.set_key("other", KeySpec())
    assert (await h.call("diffio-3.5-generation", {"apiProjectId": "row-project-1"},
                         key="other")).status == 403
    assert h.sim.stats.generations_without_upload == 0


# -- idempotency -----------------------------------------------------------

async def test_replay_answers_current_status_and_is_not_charged(h: Harness) -> None:
    pid = await h.project()
    first = await h.generate(pid, idempotencyKey="row-1")
    assert first.body["status"] == "queued" and "idempotentReplay" not in first.body
    gid = first.body["generationId"]
    assert gid == derived_generation_id(KEY, pid, "row-1")
    await h.clock.advance_to(h.clock.now() + 5.0)
    again = await h.generate(pid, idempotencyKey="row-1")
    assert again.body == {"generationId": gid, "apiProjectId": pid, "modelKey": "diffio-3.5",
                          "status": "processing", "idempotentReplay": True}
    await h.clock.advance_to(h.clock.now() + 5.0)
    assert (await h.generate(pid, idempotencyKey="row-1")).body["status"] == "complete"
    stats = h.sim.stats
    assert (stats.generations_created, stats.generations_replayed, stats.charges) == (1, 2, 1)


async def test_trimmed_keys_are_the_same_key(h: Harness) -> None:
    pid = await h.project()
    a = await h.generate(pid, idempotencyKey="  k-1\t")
    b = await h.generate(pid, idempotencyKey="k-1")
    assert a.body["generationId"] == b.body["generationId"]
    assert b.body["idempotentReplay"] is True


async def test_same_key_other_model_is_409_and_charges_nothing(h: Harness) -> None:
    pid = await h.project()
    await h.generate(pid, idempotencyKey="k")
    reply = await h.generate(pid, "diffio-2.0", idempotencyKey="k")
    assert reply.status == 409
    assert reply.body["code"] == "idempotencyKeyConflict"
    reply = await h.generate(pid, "diffio-2.0-flash", idempotencyKey="k")
    assert reply.status == 409
    assert h.sim.stats.charges == 1


async def test_34_is_an_alias_of_35_for_replays(h: Harness) -> None:
    pid = await h.project()
    a = await h.generate(pid, "diffio-3.4", idempotencyKey="k")
    assert a.body["modelKey"] == "diffio-3.5"
    b = await h.generate(pid, "diffio-3.5", idempotencyKey="k")
    assert b.status == 200 and b.body["idempotentReplay"] is True
    assert b.body["generationId"] == a.body["generationId"]
    other = await h.generate(pid, "diffio-2.0", idempotencyKey="k2")
    assert other.body["modelKey"] == "diffio-2"


async def test_same_key_on_another_project_or_key_is_a_new_generation(h: Harness) -> None:
    p1, p2 = await h.project(), await h.project()
    a = await h.generate(p1, idempotencyKey="k")
    b = await h.generate(p2, idempotencyKey="k")
    assert a.body["generationId"] != b.body["generationId"]
    assert "idempotentReplay" not in b.body
    h.sim.set_key("second", KeySpec())
    p3 = await h.project(key="second")
    c = await h.call("diffio-3.5-generation", {"apiProjectId": p3, "idempotencyKey": "k"},
                     key="second")
    assert c.body["generationId"] == derived_generation_id("second", p3, "k")
    # The key is part of the derivation, not only the project.
    assert derived_generation_id("second", p1, "k") != a.body["generationId"]
    assert h.sim.stats.charges_by_key == {KEY: 2, "second": 1}


async def test_no_key_means_a_fresh_charged_generation_each_time(h: Harness) -> None:
    pid = await h.project()
    ids = {(await h.generate(pid)).body["generationId"] for _ in range(3)}
    assert len(ids) == 3
    stats = h.sim.stats
    assert (stats.charges, stats.extra_charges, stats.generations_replayed) == (3, 2, 0)


async def test_a_charge_after_a_failed_generation_is_a_retry_not_extra(h: Harness) -> None:
    h.sim.update_config(failure_rate=1.0)
    pid = await h.project()
    await h.generate(pid, idempotencyKey="k")
    await h.clock.advance_to(h.clock.now() + 10.0)
    failed = await h.generate(pid, idempotencyKey="k")
    assert failed.body["status"] == "failed"  # a failed generation replays as failed
    h.sim.update_config(failure_rate=0.0)
    assert (await h.generate(pid, idempotencyKey="k#retry1")).status == 200
    stats = h.sim.stats
    assert (stats.retry_charges, stats.extra_charges, stats.charges) == (1, 0, 2)


# -- progress over time ----------------------------------------------------

async def test_progress_moves_queued_processing_complete(h: Harness) -> None:
    pid = await h.project()
    gid = (await h.generate(pid)).body["generationId"]
    seen = []
    for step in (0.0, 2.0, 3.0, 5.0):
        await h.clock.advance_to(h.clock.now() + step)
        body = (await h.call("get_generation_progress", {"generationId": gid})).body
        seen.append((body["status"], body["preProcessing"]["status"], body["inference"]["status"]))
        assert body["error"] is None and body["errorDetails"] is None
    assert seen == [
        ("queued", "pending", "pending"),
        ("processing", "running", "pending"),  # t=2 of 10
        ("processing", "complete", "running"),  # t=5
        ("complete", "complete", "complete"),  # t=10
    ]


async def test_a_failed_generation_names_its_error_and_stage(h: Harness) -> None:
    h.sim.update_config(failure_rate=1.0, seed=3)
    pid = await h.project()
    gid = (await h.generate(pid)).body["generationId"]
    await h.clock.advance_to(h.clock.now() + 10.0)
    body = (await h.call("get_generation_progress", {"generationId": gid})).body
    assert body["status"] == "failed"
    assert body["error"] and body["errorDetails"]
    failed = [s for s in ("preProcessing", "inference") if body[s]["status"] == "failed"]
    assert len(failed) == 1
    assert body[failed[0]]["jobState"] == "FAILED" and body[failed[0]]["error"]
    reply = await h.call("get_generation_download", {"generationId": gid, "apiProjectId": pid})
    assert (reply.status, reply.body["code"]) == (409, "generationFailed")


async def test_download_before_completion_is_409(h: Harness) -> None:
    pid = await h.project(b"x")
    gid = (await h.generate(pid)).body["generationId"]
    reply = await h.call("get_generation_download", {"generationId": gid, "apiProjectId": pid})
    assert reply.status == 409
    assert reply.body["code"] == "generationNotComplete"


# -- billing and 402 -------------------------------------------------------

async def test_prices_follow_wav_length_with_a_60_second_minimum(h: Harness) -> None:
    h.sim.update_config(price_per_second=0.01, flat_price=0.5)
    for audio, expected in [(wav_bytes(90), 0.9), (wav_bytes(30), 0.6), (b"not a wav", 0.5)]:
        before = h.sim.stats.charged_usd
        await h.generate(await h.project(audio))
        assert round(h.sim.stats.charged_usd - before, 6) == expected
    await h.generate(await h.project())  # no upload at all: flat price, and noticed
    assert h.sim.stats.charged_usd == pytest.approx(2.5)
    assert h.sim.stats.generations_without_upload == 1


async def test_spend_limit_402_carries_the_full_body(h: Harness) -> None:
    h.sim.set_key(KEY, KeySpec(spend_limit_usd=0.1))
    pid = await h.project()
    first = await h.generate(pid, idempotencyKey="a")
    assert first.status == 200
    reply = await h.generate(pid, idempotencyKey="b")
    assert reply.status == 402
    assert reply.body == {
        "error": "Spend limit exceeded for this API key.",
        "code": "spendLimitExceeded",
        "currency": "USD",
        "spendLimitUsd": 0.1,
        "estimatedCostUsd": 0.06,
        "usedUsd": 0.0,
        "pendingUsd": 0.06,
        "periodStart": "2026-09-01T00:00:00Z",
        "periodEnd": "2026-10-01T00:00:00Z",
    }
    # A replay is free and never refused for spend.
    assert (await h.generate(pid, idempotencyKey="a")).status == 200
    await h.clock.advance_to(h.clock.now() + 10.0)
    reply = await h.generate(pid, idempotencyKey="b")
    assert (reply.body["usedUsd"], reply.body["pendingUsd"]) == (0.06, 0.0)
    h.sim.update_config(api_keys={KEY: {"spend_limit_usd": 1.0}})
    assert (await h.generate(pid, idempotencyKey="b")).status == 200
    stats = h.sim.stats
    assert (stats.charges, stats.spend_limit_refusals) == (2, 2)


async def test_the_conflict_check_comes_before_the_spend_check(h: Harness) -> None:
    pid = await h.project()
    await h.generate(pid, idempotencyKey="a")
    h.sim.set_key(KEY, KeySpec(spend_limit_usd=0.0))
    assert (await h.generate(pid, "diffio-2.0", idempotencyKey="a")).status == 409
    assert (await h.generate(pid, idempotencyKey="fresh")).status == 402


# -- signed storage URLs ---------------------------------------------------

async def test_upload_url_expires_and_checks_its_signature(h: Harness) -> None:
    created = (await h.call("create_project", {"fileName": "a.wav"})).body
    url = created["uploadUrl"]
    async with h.http.put(url.replace("sig=", "sig=0"), data=b"x") as resp:
        assert resp.status == 403
    await h.wall.advance_to(h.wall.now() + 3601)
    async with h.http.put(url, data=b"x") as resp:
        assert resp.status == 403
        assert (await resp.json())["code"] == "urlExpired"
    listed = (await h.call("list_projects", {})).body["projects"]
    assert listed[0]["status"] == "uploading"
    assert h.sim.stats.uploads == 0


async def test_download_url_expires_and_api_keys_sent_to_storage_are_counted(h: Harness) -> None:
    pid = await h.project(b"abc")
    gid = (await h.generate(pid)).body["generationId"]
    await h.clock.advance_to(h.clock.now() + 10)
    body = {"generationId": gid, "apiProjectId": pid}
    url = (await h.call("get_generation_download", body)).body["downloadUrl"]
    async with h.http.get(url, headers={"X-Api-Key": KEY}) as resp:
        assert resp.status == 200
    assert h.sim.stats.signed_url_requests_with_key == 1
    async with h.http.get(url.replace("sig=", "sig=f")) as resp:
        assert resp.status == 403
    await h.wall.advance_to(h.wall.now() + 7201)
    async with h.http.get(url) as resp:
        assert resp.status == 410
    fresh = (await h.call("get_generation_download", body)).body["downloadUrl"]
    async with h.http.get(fresh) as resp:
        assert await resp.read() == restored_audio(b"abc")

"""Fault injection, the rate limit and the 1 s window stat, over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from fakeclock import FakeClock

from batcher.simulator import KeySpec, SimConfig, Simulator, run_simulator


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer sim-key"}
GEN = "diffio-4.6-flash-generation"  # the faults are the same in both API generations


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, sim: Simulator, endpoint: str,
               body: object, headers: dict[str, str] = AUTH) -> tuple[int, str, str]:
    async with http.post(f"{sim.base_url}/{endpoint}", json=body, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.text()


async def test_lost_response_cuts_the_connection_after_charging(
    http: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimConfig(lost_rate=1.0)) as sim:
        sim.add_project("sim-key", "p1")
        body = {"apiProjectId": "p1", "idempotencyKey": "row-1"}
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, sim, GEN, body)
        stats = sim.stats
        assert (stats.generations_created, stats.charges, stats.lost_responses) == (1, 1, 1)
        assert stats.status_count(GEN, "lost") == 1
        # Other endpoints are never lost.
        status, _, _ = await post(http, sim, "list_projects", {})
        assert status == 200
        sim.update_config(lost_rate=0.0)
        status, _, text = await post(http, sim, GEN, body)
        assert status == 200 and json.loads(text)["idempotentReplay"] is True
        assert (sim.stats.charges, sim.stats.extra_charges) == (1, 0)


async def test_injected_500_happens_before_anything_is_created(
    http: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimConfig(error_rate=1.0)) as sim:
        sim.add_project("sim-key", "p1")
        status, ctype, text = await post(http, sim, GEN, {"apiProjectId": "p1"})
        assert (status, ctype) == (500, "application/json")
        assert json.loads(text)["code"] == "internalError"
        status, _, _ = await post(http, sim, "create_project", {"fileName": "a.wav"})
        assert status == 500
        stats = sim.stats
        assert (stats.generations_created, stats.projects_created, stats.charges) == (0, 0, 0)
        assert stats.errors_injected == 2
        # Auth still comes first: a bad key is 401, not an injected 500.
        status, _, _ = await post(http, sim, "list_projects", {}, {"X-Api-Key": "bad"})
        assert status == 401


async def test_html_502_page(http: aiohttp.ClientSession) -> None:
    async with run_simulator(SimConfig(html_rate=1.0)) as sim:
        sim.add_project("sim-key", "p1")
        status, ctype, text = await post(http, sim, GEN, {"apiProjectId": "p1"})
        assert (status, ctype) == (502, "text/html")
        assert "<h1>502 Bad Gateway</h1>" in text
        assert sim.stats.generations_created == 0
        assert sim.stats.html_errors_injected == 1


async def test_truncated_json_is_a_200_after_the_work(http: aiohttp.ClientSession) -> None:
    async with run_simulator(SimConfig(truncated_rate=1.0)) as sim:
        sim.add_project("sim-key", "p1")
        body = {"apiProjectId": "p1", "idempotencyKey": "k"}
        status, ctype, text = await post(http, sim, GEN, body)
        assert (status, ctype) == (200, "application/json")
        assert text.startswith('{"generationId"')
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        assert (sim.stats.generations_created, sim.stats.truncated_responses) == (1, 1)
        sim.update_config(truncated_rate=0)
        status, _, text = await post(http, sim, GEN, body)
        assert json.loads(text)["idempotentReplay"] is True


async def test_latency_delays_every_answer(http: aiohttp.ClientSession) -> None:
    async with run_simulator(SimConfig(latency=(0.15, 0.2))) as sim:
        started = time.monotonic()
        status, _, _ = await post(http, sim, "list_projects", {})
        elapsed = time.monotonic() - started
    assert status == 200
    assert 0.15 <= elapsed < 1.5


async def test_faults_replay_with_the_same_seed(http: aiohttp.ClientSession) -> None:
    outcomes = []
    for _ in range(2):
        async with run_simulator(SimConfig(error_rate=0.5, seed=42)) as sim:
            outcomes.append([(await post(http, sim, "list_projects", {}))[0] for _ in range(12)])
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {200, 500}


async def test_rate_limit_answers_429_with_retry_after(http: aiohttp.ClientSession) -> None:
    clock = FakeClock(500.0)
    sim = Simulator(SimConfig(rate_limit=3), clock=clock)
    sim.set_key("other", KeySpec())
    async with run_simulator(sim):
        statuses = []
        for offset in (0.0, 0.2, 0.4, 0.5):
            clock.set_time(500.0 + offset)
            status, _, _ = await post(http, sim, "list_projects", {})
            statuses.append(status)
        assert statuses == [200, 200, 200, 429]
        async with http.post(f"{sim.base_url}/list_projects", json={}, headers=AUTH) as resp:
            assert resp.status == 429
            assert await resp.json() == {"error": "Rate limit exceeded.", "code": "rateLimited"}
            retry_after = int(resp.headers["Retry-After"])
            assert retry_after >= 1
        # The limit is per key.
        status, _, _ = await post(http, sim, "list_projects", {}, {"X-Api-Key": "other"})
        assert status == 200
        clock.set_time(501.0)  # the request at 500.0 left the window
        assert (await post(http, sim, "list_projects", {}))[0] == 200
        stats = sim.stats
        assert stats.rate_limited == 2
        assert stats.status_count("list_projects", 429) == 2
        # 429s count as requests: five sim-key arrivals in 500.0 .. 500.5.
        assert stats.max_requests_per_second_by_key["sim-key"] == 5


async def test_window_stat_is_exact_and_half_open(http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    sim = Simulator(SimConfig(), clock=clock.now)
    async with run_simulator(sim):
        # 11 requests 0.1 s apart: any half-open 1 s window holds at most 10.
        for i in range(11):
            clock.set_time(i / 10)
            await post(http, sim, "list_projects", {})
        assert sim.stats.max_requests_per_second_by_key == {"sim-key": 10}
        clock.set_time(1.05)  # now (0.05, 1.05] holds 0.1 .. 1.0 and this one: 11
        await post(http, sim, "list_projects", {}, {"X-Api-Key": "unknown"})
        stats = sim.stats
        assert stats.max_requests_per_second == 11
        assert stats.max_requests_per_second_by_key == {"sim-key": 10, "unknown": 1}
        assert stats.requests == 12
        assert stats.status_count("list_projects", 401) == 1


async def test_control_endpoints_patch_knobs_and_show_stats(
    http: aiohttp.ClientSession,
) -> None:
    async with run_simulator() as sim:
        root = (sim.base_url or "").removesuffix("/v1")
        patch = {"error_rate": 1, "api_keys": {"k2": {"spend_limit_usd": 100}}}
        async with http.post(f"{root}/_sim/config", json=patch) as resp:
            assert resp.status == 200
            config = await resp.json()
        assert config["error_rate"] == 1.0
        assert config["api_keys"]["k2"]["spend_limit_usd"] == 100
        assert config["api_keys"]["sim-key"]["active"] is True  # merged, not replaced
        assert (await post(http, sim, "list_projects", {}, {"X-Api-Key": "k2"}))[0] == 500
        async with http.post(f"{root}/_sim/config", json={"error_rate": 2}) as resp:
            assert resp.status == 400
        async with http.post(f"{root}/_sim/config", json={"nonsense": 1}) as resp:
            assert resp.status == 400
        async with http.post(f"{root}/_sim/projects",
                             json={"apiKey": "k2", "apiProjectId": "given"}) as resp:
            assert resp.status == 200
        assert "given" in sim.state.projects
        async with http.get(f"{root}/_sim/stats") as resp:
            stats = await resp.json()
        assert stats["errors_injected"] == 1
        assert stats == sim.stats.to_dict()

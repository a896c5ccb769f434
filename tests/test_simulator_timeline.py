"""The events hook: observers are told each new generation's planned status
changes, and the times agree with what progress answers."""

from __future__ import annotations

import logging
import math

import pytest
from sim_harness import KEY, serve

from batcher.simulator import GenerationTimeline, SimConfig, Simulator
from batcher.simulator.timeline import api_key_id

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[GenerationTimeline] = []

    def generation_created(self, timeline: GenerationTimeline) -> None:
        self.seen.append(timeline)


class Broken:
    def generation_created(self, timeline: GenerationTimeline) -> None:
        raise RuntimeError("observer bug")


async def test_observers_get_one_timeline_per_new_generation_matching_progress() -> None:
    async with serve(SimConfig(duration=(10.0, 10.0))) as h:
        recorder = Recorder()
        h.sim.add_observer(recorder)
        pid = await h.confirmed_project()
        created = await h.generate(pid, "diffio-4.5-flash", idempotencyKey="row-1")
        await h.generate(pid, "diffio-4.6-flash", idempotencyKey="row-1")  # a replay
        assert len(recorder.seen) == 1
        timeline = recorder.seen[0]
        assert timeline.generation_id == created.body["generationId"]
        assert (timeline.api_project_id, timeline.model_key) == (pid, "diffio-4.6-flash")
        assert timeline.has_video is False
        assert [(c.status, c.at, c.wall) for c in timeline.changes] == [
            ("queued", 1000.0, h.wall.t),
            ("processing", 1001.0, h.wall.t + 1),
            ("complete", 1010.0, h.wall.t + 10),
        ]
        body = {"generationId": timeline.generation_id}
        for change in timeline.changes:
            h.clock.t = math.nextafter(change.at, -math.inf)
            before = (await h.call("get_generation_progress", body)).body["status"]
            assert before != change.status or change.status == "queued"
            h.clock.t = change.at
            assert (await h.call("get_generation_progress", body)).body["status"] == change.status


async def test_a_failure_is_planned_with_the_error_progress_will_show() -> None:
    sim = Simulator(SimConfig(duration=(0.5, 2.0), failure_rate=1.0, seed=3),
                    clock=lambda: 50.0, wall=lambda: 1_700_000_000.0)
    recorder = Recorder()
    sim.add_observer(recorder)
    sim.add_project(KEY, "p")
    for n in range(6):  # both failing stages come up
        sim.state.submit(KEY, "diffio-4.6-pro", "p", {"seed": n}, {}, None)
    for timeline in recorder.seen:
        gen = sim.state.generations[timeline.generation_id]
        last = timeline.changes[-1]
        assert last.status == "failed"
        assert gen.phase(last.at).status == "failed"
        assert (last.error, last.error_details) == (gen.phase(last.at).error,
                                                    gen.phase(last.at).error_details)
        assert last.at == gen.ends_at and last.wall == 1_700_000_000.0 + (last.at - 50.0)
    assert {sim.state.generations[t.generation_id].failed_stage for t in recorder.seen} == {
        "preProcessing", "inference"}


async def test_a_zero_duration_lists_every_change_at_once() -> None:
    sim = Simulator(SimConfig(duration=(0.0, 0.0)), clock=lambda: 7.0)
    recorder = Recorder()
    sim.add_observer(recorder)
    sim.add_project(KEY, "p")
    sim.state.submit(KEY, "diffio-4.6-flash", "p", {}, {}, None)
    changes = recorder.seen[0].changes
    assert [(c.status, c.at) for c in changes] == [
        ("queued", 7.0), ("processing", 7.0), ("complete", 7.0)]


async def test_a_broken_observer_is_logged_and_the_generation_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve(SimConfig()) as h:
        recorder = Recorder()
        h.sim.add_observer(Broken())
        h.sim.add_observer(recorder)
        h.sim.add_project(KEY, "p")
        with caplog.at_level(logging.ERROR, logger="batcher.simulator.timeline"):
            reply = await h.generate("p", "diffio-4.6-flash")
        assert reply.status == 200
        assert len(recorder.seen) == 1 and h.sim.stats.charges == 1
        assert [getattr(r, "event", None) for r in caplog.records] == ["simulator.observer_failed"]


async def test_the_timeline_never_shows_the_api_key() -> None:
    sim = Simulator(SimConfig.from_mapping({"api_keys": ["diffio_live_secret"]}), clock=lambda: 0.0)
    recorder = Recorder()
    sim.add_observer(recorder)
    sim.add_project("diffio_live_secret", "p")
    sim.state.submit("diffio_live_secret", "diffio-4.6-flash", "p", {}, {}, None)
    timeline = recorder.seen[0]
    assert timeline.api_key == "diffio_live_secret"  # to find the key's webhook settings
    assert "secret" not in repr(timeline) and "secret" not in timeline.api_key_id
    assert timeline.api_key_id == api_key_id("diffio_live_secret") != api_key_id("other")

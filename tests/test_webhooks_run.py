"""Webhooks inside a run (fast tier): the safety net's patience, the settings,
and whole runs in-process against the embedded simulator delivering real
signed events to the run's real receiver.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from batcher.api import make_settings
from batcher.errors import ConfigError, WebhookSecretError
from batcher.run.poll import PollItem
from batcher.run.webhooks import SafetyNet
from batcher.webhooks import WebhookSecret

SECRET = WebhookSecret(bytes(range(30, 54)))


def manifest(path: Path, rows: int) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["apiProjectId", "seed"])
        for i in range(rows):
            writer.writerow([f"proj-{i:03d}", i])
    return path


# -- the safety net ------------------------------------------------------------------


def test_patience_is_a_floor_until_learned_then_follows_event_times_within_the_ceiling(
        ) -> None:
    net = SafetyNet(poll_interval=1.0, ceiling=120.0)
    assert net.patience() == 10.0  # four poll intervals, at least 10 s
    for seconds in (2.0, 2.5, 3.0, 3.5, 4.0):
        net.observe(seconds)
    assert net.patience() == pytest.approx(1.5 * 4.0 + 1.0)
    slow = SafetyNet(poll_interval=5.0, ceiling=30.0)
    for _ in range(10):
        slow.observe(600.0)
    assert slow.patience() == 30.0
    fast = SafetyNet(poll_interval=2.0)
    for _ in range(10):
        fast.observe(0.1)
    assert fast.patience() == 4.0  # at least twice the poll interval


def test_a_terminal_event_before_the_row_is_watched_settles_it_when_it_is() -> None:
    from batcher.ledger.webhook_events import StoredEvent
    from batcher.webhooks import Disposition, GenerationEvent

    net = SafetyNet(poll_interval=1.0)
    settled: list[PollItem] = []
    woken: list[bool] = []
    net.bind(lambda: woken.append(True), settled.append)
    ending = GenerationEvent.from_payload({
        "eventType": "generation.completed", "eventId": "e1", "createdAt":
        "2026-01-01T00:00:05Z", "apiKeyId": "k", "generationId": "gen-1", "status": "complete"})
    net.note(StoredEvent(1, "m1", ending, 0.0, Disposition.RECORDED))
    assert not settled
    item = PollItem("r1", "gen-1", None, submitted_at=0.0)
    net.watch(item, resumed=False)
    assert settled == [item] and woken
    assert net.take_ready() == [(item, ending)]
    # a stale event is never applied
    other = PollItem("r2", "gen-2", None, submitted_at=0.0)
    net.watch(other, resumed=False)
    stale = GenerationEvent.from_payload({**ending.to_payload(), "generationId": "gen-2"})
    net.note(StoredEvent(2, "m2", stale, 0.0, Disposition.STALE))
    assert net.take_ready() == [] and settled == [item]


# -- settings ----------------------------------------------------------------------------


def test_webhook_settings_need_the_secret_in_the_environment_and_never_store_it(
        tmp_path: Path) -> None:
    source = manifest(tmp_path / "m.csv", 1)
    with pytest.raises(WebhookSecretError, match="BATCHER_WEBHOOK_SECRET") as missing:
        make_settings(source, api_key="k", env={}, webhook_listen="8787")
    assert "whsec_" not in str(missing.value).replace("(whsec_…)", "")
    env = {"HOOK_SECRET": SECRET.reveal()}
    settings = make_settings(source, api_key="k", env=env, webhook_listen="8787",
                             webhook_secret_env="HOOK_SECRET")
    assert settings.webhooks and settings.webhook_listen == "8787"
    assert SECRET.reveal() not in repr(settings) + repr(settings.describe())
    with pytest.raises(ConfigError, match="webhook-listen"):
        make_settings(source, api_key="k", env=env, webhook_listen="host:port",
                      webhook_secret_env="HOOK_SECRET")
    with pytest.raises(ConfigError, match="webhook-events"):
        make_settings(source, api_key="k", env=env, webhook_events="yes")
    assert not make_settings(source, api_key="k", env=env).webhooks


# -- whole runs in-process ---------------------------------------------------------------


@pytest.mark.anyio
async def test_a_simulated_run_with_webhooks_completes_every_row_without_polling(
        tmp_path: Path) -> None:
    rows = 20
    result = await _run(tmp_path, rows)
    summary: dict[str, Any] = result.summary()
    assert result.exit_code == 0, summary
    assert summary["counts"]["complete"] == rows
    assert summary["polls"] == 0
    hooks = summary["webhooks"]
    assert hooks["eventsApplied"] == rows and hooks["pollsSaved"] == rows
    assert hooks["recorded"] >= 2 * rows
    assert sum(hooks["refused"].values()) == 0


async def _run(tmp_path: Path, rows: int, ceiling: float = 120.0, **faults: float) -> Any:
    from batcher.api import run_job

    settings = make_settings(manifest(tmp_path / "m.csv", rows), simulate=True,
                             webhook_listen="0", rate=50, poll_interval=0.5, env={},
                             webhook_poll_ceiling=ceiling)
    sim = {"duration": [0.3, 0.6], "webhooks": dict(faults)}
    return await run_job(settings, sim_config=sim, progress="off")


@pytest.mark.anyio
async def test_dropped_endings_are_polled_and_forgeries_fail_nothing(tmp_path: Path) -> None:
    rows = 20
    # A short ceiling: the lost endings are polled after 2 s, not 10.
    result = await _run(tmp_path, rows, ceiling=2.0, drop=0.5, forged=1.0, duplicate=1.0)
    summary: dict[str, Any] = result.summary()
    assert result.exit_code == 0, summary
    assert summary["counts"] == {"pending": 0, "submitted": 0, "complete": rows, "failed": 0}
    hooks = summary["webhooks"]
    assert hooks["refused"]["badSignature"] > 0
    assert 0 < summary["polls"] <= 2 * rows
    assert hooks["eventsApplied"] + summary["polls"] >= rows


@pytest.mark.anyio
async def test_a_resumed_run_takes_the_endings_recorded_while_it_was_down_without_polling(
        tmp_path: Path) -> None:
    import anyio

    from batcher.api import run_job
    from batcher.ledger import open_ledger
    from batcher.model import RunInfo, Stage
    from batcher.webhooks import Disposition, GenerationEvent

    rows = 6
    source = manifest(tmp_path / "m.csv", rows)
    # The first run submits everything, then dies while the generations run.
    first = make_settings(source, simulate=True, rate=50, poll_interval=30, env={})
    with anyio.move_on_after(2.0):
        await run_job(first, sim_config={"duration": [60, 60]}, progress="off")
    led = open_ledger(first.ledger)
    await led.open(RunInfo.start("test"))
    try:
        submitted = [row async for row in led.rows(stages=frozenset({Stage.SUBMITTED}))]
        assert len(submitted) == rows
        # Meanwhile `webhooks serve` recorded their endings.
        for n, row in enumerate(submitted):
            ending = GenerationEvent.from_payload({
                "eventType": "generation.completed", "eventId": f"e{n}",
                "createdAt": "2026-01-01T00:00:09Z", "apiKeyId": "k",
                "generationId": row.generation_id, "status": "complete"})
            assert await led.record_webhook_event(ending, f"m{n}") is Disposition.RECORDED
    finally:
        await led.close(0)
    # The resumed run reads them before it polls anything: no poll, all complete.
    second = make_settings(source, simulate=True, rate=50, poll_interval=30, env={},
                           webhook_events="ledger")
    with anyio.fail_after(30):
        result = await run_job(second, sim_config={"duration": [60, 60]}, progress="off")
    summary = result.summary()
    assert result.exit_code == 0, summary
    assert summary["counts"]["complete"] == rows and summary["polls"] == 0
    assert summary["webhooks"]["eventsApplied"] == rows

"""The runner in-process: real stages, a memory ledger, one fake clock, the simulator on loopback.

Every test builds the real :class:`~batcher.run.Runner` over a
:class:`~batcher.ledger.MemoryLedger`, a real :class:`~batcher.client.DiffioClient`
and the simulator's aiohttp app served in this process on an ephemeral
loopback port. The runner, its rate gate, the simulator and the ledger all
read the one :class:`FakeClock`, which jumps ahead whenever every task waits:
minutes of generations, backoffs and lease expiries take milliseconds. The
outcomes asserted are real ones: ledger stages, the simulator's charges, the
attempts recorded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import write_wav
from runner_harness import KEY, job_maker, until

from batcher.errors import LedgerError, SpendLimit
from batcher.ledger import MemoryLedger
from batcher.ledger.base import LEASE_TAKEN_OVER
from batcher.model import Stage
from batcher.ops.logs import RATE_LIMITED, REQUEST_RETRY_SCHEDULED, RUN_HALTED
from batcher.run import RunResult
from batcher.simulator import KeySpec, SimConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
async def make_job(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``job = await make_job(manifest_text, sim_config, shared=False)``; the simulator
    serves the API generation of the default model in this process until the test
    ends, and the clock autojumps."""
    async with job_maker(tmp_path) as make:
        yield make


def project_rows(n: int, prompt: str = "clean") -> str:
    return "apiProjectId,prompt\n" + "".join(f"p-{i},{prompt}\n" for i in range(n))


# ------------------------------------------------------------------ the basics


async def test_file_and_project_rows_complete_each_paid_once(make_job: Any,
                                                             tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", freq=300)
    write_wav(tmp_path / "b.wav", freq=500)
    job = await make_job("apiProjectId,file,prompt\np-1,,x\np-2,,y\n,a.wav,z\n,b.wav,z\n",
                         SimConfig(duration=(3.0, 9.0), auto_create_projects=True))
    result = await job.run()
    assert result is not None and result.exit_code == 0
    assert result.counts == {"pending": 0, "submitted": 0, "complete": 4, "failed": 0}
    stats = job.sim.stats
    assert (stats.charges, stats.extra_charges, stats.projects_confirmed) == (4, 0, 2)
    rows = {row.line: row for row in await job.rows()}
    for line in (3, 4):
        out = anyio.Path(rows[line].output_path)
        assert out.parent == anyio.Path(tmp_path / "out")
        assert await out.exists() and rows[line].output_sha256
    # One create, one upload, one post, at least one poll, a URL and a download.
    assert all(row.attempts >= 3 for row in rows.values())


# ------------------------------------------------------------------ resume


async def test_a_run_cancelled_mid_flight_resumes_without_paying_twice(make_job: Any) -> None:
    job = await make_job(project_rows(12), SimConfig(duration=(20.0, 30.0),
                                                     auto_create_projects=True))
    first = await job.run(stop_when=lambda: job.sim.stats.generations_created >= 5)
    assert first is None  # cancelled
    counts = await job.stage_counts()
    recorded = counts["submitted"]
    assert counts["complete"] == 0 and 1 <= recorded < 12
    # Posts the API answered (and charged) whose answer the cancel cut off.
    lost = job.sim.stats.generations_created - recorded
    polled_before = job.sim.stats.status_count("get_generation_progress", 200)

    second = await job.run()
    assert second is not None and second.exit_code == 0
    assert second.counts["complete"] == 12
    stats = job.sim.stats
    assert (stats.charges, stats.extra_charges) == (12, 0)
    # What the ledger holds as submitted is polled, never posted again; the
    # rest is posted with its key, and a lost answer comes back as a replay.
    assert second.stats.submitted == 12 - recorded
    assert second.stats.replays == stats.generations_replayed == lost
    assert stats.status_count("get_generation_progress", 200) > polled_before


# ------------------------------------------------------------------ halts


async def test_a_bad_key_halts_at_once_and_nothing_is_charged(
        make_job: Any, caplog: pytest.LogCaptureFixture) -> None:
    job = await make_job(project_rows(6), SimConfig(auto_create_projects=True))
    result = await job.run(key="not-a-key")
    halted = [r for r in caplog.records if getattr(r, "event", None) == RUN_HALTED]
    assert len(halted) == 1 and halted[0].code == "invalidApiKey"  # type: ignore[attr-defined]
    assert result is not None and result.exit_code == 3
    assert result.counts["pending"] == 6
    assert job.sim.stats.charges == 0
    assert job.sim.stats.requests <= 4  # the posts in flight when the first 401 came
    errors = [row.error for row in await job.rows() if row.error]
    assert errors and {e["httpStatus"] for e in errors} == {401}

    again = await job.run()
    assert again is not None and again.exit_code == 0
    assert job.sim.stats.charges == 6
    assert all(row.error is None for row in await job.rows())


async def test_the_spend_limit_halts_submissions_finishes_what_is_in_flight_then_resumes(
        make_job: Any) -> None:
    # Project rows cost the simulator's flat price (0.06): the third post passes 0.13.
    keys = {KEY: KeySpec(spend_limit_usd=0.13)}
    job = await make_job(project_rows(6), SimConfig(api_keys=keys, auto_create_projects=True))
    result = await job.run(concurrency=1)
    assert result is not None and result.exit_code == 3
    assert isinstance(result.halt_error, SpendLimit)
    assert result.counts == {"pending": 4, "submitted": 0, "complete": 2, "failed": 0}
    assert job.sim.stats.charges == 2

    job.sim.update_config(api_keys={KEY: KeySpec()})
    again = await job.run()
    assert again is not None and again.exit_code == 0
    stats = job.sim.stats
    assert (stats.charges, stats.extra_charges) == (6, 0)


async def test_a_key_revoked_mid_run_stops_everything_and_the_rerun_only_polls(
        make_job: Any) -> None:
    job = await make_job(project_rows(6), SimConfig(duration=(30.0, 40.0),
                                                    auto_create_projects=True))

    async def revoke_once_all_are_posted() -> None:
        await until(lambda: job.sim.stats.generations_created == 6)
        job.sim.update_config(api_keys={KEY: KeySpec(active=False)})

    async with anyio.create_task_group() as tg:
        tg.start_soon(revoke_once_all_are_posted)
        result = await job.run()
    assert result is not None and result.exit_code == 3
    assert result.counts["submitted"] == 6  # polls met the 403: the rows wait, resumable
    assert result.halt_error is not None and result.halt_error.halts_run

    job.sim.update_config(api_keys={KEY: KeySpec()})
    again = await job.run()
    assert again is not None and again.exit_code == 0
    assert again.stats.submitted == 0  # nothing posted again: every row was polled
    assert (job.sim.stats.charges, job.sim.stats.extra_charges) == (6, 0)


# ------------------------------------------------------------------ followers


async def test_rows_repeating_a_request_follow_it_and_are_not_charged(
        make_job: Any, tmp_path: Path) -> None:
    write_wav(tmp_path / "take.wav")
    (tmp_path / "copy.wav").write_bytes((tmp_path / "take.wav").read_bytes())
    job = await make_job(
        "apiProjectId,file,prompt,output\n"
        "p-1,,same,\np-1,,same,\n,take.wav,,first.mp3\n,copy.wav,,second.mp3\n",
        SimConfig(duration=(3.0, 9.0), auto_create_projects=True))
    result = await job.run()
    assert result is not None and result.exit_code == 0
    assert result.counts["complete"] == 4
    assert job.sim.stats.charges == 2
    rows = {row.line: row for row in await job.rows()}
    assert rows[2].leader_row_id == rows[1].row_id
    assert rows[4].leader_row_id == rows[3].row_id
    assert rows[2].generation_id == rows[1].generation_id
    first, second = anyio.Path(rows[3].output_path), anyio.Path(rows[4].output_path)
    assert first.name == "first.mp3" and second.name == "second.mp3"
    assert await first.read_bytes() == await second.read_bytes()
    assert rows[4].output_sha256 == rows[3].output_sha256


# ------------------------------------------------------------------ retry-failed


async def test_retry_failed_pays_once_more_under_a_new_key(make_job: Any) -> None:
    job = await make_job(project_rows(3), SimConfig(failure_rate=1.0,
                                                    auto_create_projects=True))
    first = await job.run()
    assert first is not None and first.exit_code == 1
    before = {row.row_id: row for row in await job.rows()}
    assert {row.error["code"] for row in before.values() if row.error} == {"generationFailed"}

    # Without --retry-failed a failed row stays failed and costs nothing.
    same = await job.run()
    assert same is not None and same.exit_code == 1 and job.sim.stats.charges == 3

    job.sim.update_config(failure_rate=0.0)
    again = await job.run(retry_failed=True)
    assert again is not None and again.exit_code == 0
    stats = job.sim.stats
    assert (stats.charges, stats.extra_charges) == (6, 0)
    for row in await job.rows():
        old = before[row.row_id]
        assert row.stage is Stage.COMPLETE and row.retry_count == 1
        assert row.idempotency_key != old.idempotency_key
        assert row.base_key == old.idempotency_key


# ------------------------------------------------------------------ 429 storm


async def test_a_429_storm_slows_everyone_and_every_row_still_completes_once(
        make_job: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="batcher")
    job = await make_job(project_rows(10), SimConfig(rate_limit=2.0, duration=(1.0, 2.0),
                                                     auto_create_projects=True))
    result = await job.run(rate=20.0, concurrency=8)
    assert result is not None and result.exit_code == 0
    stats = job.sim.stats
    assert stats.rate_limited > 0 and result.stats.rate_limited == stats.rate_limited
    assert (stats.charges, stats.extra_charges) == (10, 0)
    rows = await job.rows()
    # The 429s are attempts of the rows that met them.
    assert sum(row.attempts for row in rows) >= 10 * 2 + stats.rate_limited
    events = {getattr(r, "event", None) for r in caplog.records}
    assert {RATE_LIMITED, REQUEST_RETRY_SCHEDULED} <= events


# ------------------------------------------------------------------ several hosts


class DyingLedger:
    """Another host's view of the shared ledger; after ``die()`` every call fails,
    as for a host whose process is gone (its leases stay until they expire)."""

    def __init__(self, ledger: MemoryLedger) -> None:
        self._ledger = ledger
        self.dead = False

    def die(self) -> None:
        self.dead = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ledger, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise LedgerError("host is gone")
            return attr(*args, **kwargs)

        return call


async def test_two_hosts_share_a_ledger_and_one_takes_over_the_others_rows(
        make_job: Any) -> None:
    job = await make_job(project_rows(40), SimConfig(duration=(2.0, 4.0),
                                                     auto_create_projects=True), shared=True)
    dying = DyingLedger(job.ledger)
    outcome: dict[str, Any] = {}

    async def host(name: str, ledger: Any, **kw: Any) -> None:
        try:
            # At 1 request/s each, a host leases 2 x --concurrency rows at a time.
            outcome[name] = await job.run(ledger=ledger, lease_ttl=3.0, rate=2.0, **kw)
        except* LedgerError:
            outcome[name] = "gone"

    async def kill_a_mid_run(scope: anyio.CancelScope) -> None:
        await until(lambda: job.sim.stats.generations_created >= 8)
        dying.die()
        scope.cancel()

    async with anyio.create_task_group() as hosts:
        hosts.start_soon(host, "b", job.ledger)
        async with anyio.create_task_group() as a:
            a.start_soon(host, "a", dying)
            a.start_soon(kill_a_mid_run, a.cancel_scope)

    b = outcome["b"]
    assert isinstance(b, RunResult) and b.exit_code == 0
    assert b.counts["complete"] == 40
    stats = job.sim.stats
    assert (stats.generations_created, stats.extra_charges) == (40, 0)
    taken = [e for row in await job.rows() for e in await job.ledger.events(row.row_id)
             if e.event == LEASE_TAKEN_OVER]
    assert taken, "b took over none of a's leased rows"

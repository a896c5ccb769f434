"""File rows against today's API, in-process: uploads in parts, checked, resumed, confirmed.

The runner, a memory ledger and the simulator (``api="current"``) on one
fake clock, as in tests/test_runner.py. Part sizes are a few KiB, so the
small WAV files of these tests go up in several parts. What is asserted is
what the simulator saw (parts received and re-sent, projects confirmed,
charges, the headers that reached the upload host) and what the ledger holds.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import write_wav
from runner_harness import job_maker, until

from batcher.errors import ModelRetired
from batcher.ledger import SqliteLedger
from batcher.model import RunInfo, Stage
from batcher.ops.logs import RUN_HALTED
from batcher.ops.progress import progress_json, progress_line
from batcher.ops.status import status_main
from batcher.run.stats import RunStats
from batcher.run.upload import plan_parts
from batcher.simulator import KeySpec, SimConfig, restored_audio
from batcher.version import USER_AGENT

pytestmark = pytest.mark.anyio

PART = 4096


@pytest.fixture
async def make_job(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Jobs whose simulator serves today's API (the 4.6 models)."""
    async with job_maker(tmp_path, model="diffio-4.6-flash") as make:
        yield make


def config(**knobs: Any) -> SimConfig:
    return SimConfig(duration=(3.0, 9.0), part_size=PART, **knobs)


def parts_of(path: Path) -> int:
    return len(plan_parts(path.stat().st_size, PART))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restores(row: Any, source: bytes | None = None) -> bool:
    """Whether the row's output is the restoration of ``source`` (default: its file now)."""
    data = Path(row.source_path).read_bytes() if source is None else source
    return Path(row.output_path).read_bytes() == restored_audio(data)


# ------------------------------------------------------------------ the basics


def test_plan_parts_numbers_from_one_and_an_empty_file_is_one_empty_part() -> None:
    assert plan_parts(10, 4) == [(1, 0, 4), (2, 4, 4), (3, 8, 2)]
    assert plan_parts(8, 4) == [(1, 0, 4), (2, 4, 4)]
    assert plan_parts(0, 4) == [(1, 0, 0)]
    with pytest.raises(ValueError):
        plan_parts(10, 0)


async def test_file_rows_go_up_in_parts_are_confirmed_and_each_paid_once(
        make_job: Any, tmp_path: Path) -> None:
    files = [write_wav(tmp_path / f"t{i}.wav", seconds=0.6 + 0.2 * i, freq=300 + 50 * i)
             for i in range(3)]
    job = await make_job("file,prompt\n" + "".join(f"{f.name},clean\n" for f in files),
                         config())
    result = await job.run()
    assert result is not None and result.exit_code == 0, result.summary()
    stats = job.sim.stats
    parts = sum(parts_of(f) for f in files)
    assert parts > 3 * 2  # several parts each
    assert (stats.uploads_started, stats.uploads_completed, stats.projects_confirmed) == (3, 3, 3)
    assert (stats.parts_received, stats.parts_resent) == (parts, 0)
    assert (stats.charges, stats.extra_charges, stats.generations_upload_missing) == (3, 0, 0)
    assert stats.api_keys_at_upload_host == 0 and stats.signed_url_requests_with_key == 0
    # Every request, to the API, the upload host and the downloads, names batcher.
    assert set(stats.user_agents) == {USER_AGENT}
    for row in await job.rows():
        assert row.stage is Stage.COMPLETE and row.upload_session is None
        assert row.upload_id is None
        assert restores(row) and row.source_sha256 == sha256(Path(row.source_path))
        # Confirmed uploads leave no part records behind.
        events = [e.event for e in await job.ledger.events(row.row_id)]
        assert events[:4] == ["imported", "projectCreated", "uploadStarted", "uploaded"]


async def run_with(job: Any, side: Callable[[], Any], **changes: Any) -> Any:
    """Run the job to its end while ``side()`` (a coroutine function) runs beside it."""
    result = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(side)
        result = await job.run(**changes)
        tg.cancel_scope.cancel()
    return result


# ------------------------------------------------------------------ resume


async def test_a_run_cancelled_mid_upload_resumes_from_the_next_part(
        make_job: Any, tmp_path: Path) -> None:
    files = [write_wav(tmp_path / f"t{i}.wav", seconds=1.0, freq=300 + 70 * i) for i in range(4)]
    total = sum(parts_of(f) for f in files)
    job = await make_job("file,prompt\n" + "".join(f"{f.name},clean\n" for f in files),
                         config(part_latency=(0.002, 0.004)))
    first = await job.run(stop_when=lambda: job.sim.stats.parts_received >= total // 2)
    assert first is None
    halfway = [r for r in await job.rows() if r.stage is Stage.PROJECT_CREATED]
    assert halfway, "no upload was cut halfway"
    recorded = {r.row_id: await job.ledger.upload_parts(r.row_id, r.upload_id or "")
                for r in halfway}
    assert any(recorded.values())
    for row in halfway:
        assert row.upload_session is not None and row.upload_id is not None
        for part in recorded[row.row_id]:
            assert part.size in (PART, (row.source_size or 0) % PART)
    received = job.sim.stats.parts_received

    second = await job.run()
    assert second is not None and second.exit_code == 0, second.summary()
    stats = job.sim.stats
    # One upload per file, ever: the cut ones went on in their session.
    assert (stats.projects_created, stats.uploads_started, stats.projects_confirmed) == (4, 4, 4)
    # At most the part in flight at the cut is sent again, per upload.
    assert stats.parts_resent <= len(halfway)
    assert stats.parts_received - received <= total - sum(map(len, recorded.values())) + len(
        halfway)
    assert (stats.charges, stats.extra_charges, stats.generations_upload_missing) == (4, 0, 0)
    for row in await job.rows():
        assert restores(row)


@pytest.mark.parametrize("when", ["between runs", "mid-upload"])
async def test_an_expired_session_means_a_fresh_project_never_a_second_charge(
        make_job: Any, tmp_path: Path, when: str) -> None:
    write_wav(tmp_path / "take.wav", seconds=2.0, freq=400)
    job = await make_job("file\ntake.wav\n", config(part_latency=(0.002, 0.004),
                                                    upload_session_ttl=600.0))
    if when == "between runs":
        assert await job.run(stop_when=lambda: job.sim.stats.parts_received >= 3) is None
        (row,) = await job.rows()
        assert row.stage is Stage.PROJECT_CREATED and row.upload_id is not None
        job.clock.advance(3600.0)  # the session is long over: judged before any part
        result = await job.run()
    else:
        async def expire_while_uploading() -> None:
            await until(lambda: job.sim.stats.parts_received >= 2)
            job.clock.advance(601.0)  # the upload host refuses the next part

        result = await run_with(job, expire_while_uploading)
        assert job.sim.stats.upload_sessions_expired >= 1
    assert result is not None and result.exit_code == 0, result.summary()
    (row,) = await job.rows()
    stats = job.sim.stats
    assert (stats.projects_created, stats.projects_confirmed, stats.charges) == (2, 1, 1)
    assert stats.extra_charges == 0 and restores(row)
    projects = job.sim.state.projects.values()
    (first,) = [p for p in projects if p.api_project_id != row.api_project_id]
    assert not first.generation_ids and not first.confirmed  # never generated on


@pytest.mark.parametrize("expire", [False, True])
async def test_a_halt_between_the_upload_and_its_confirmation_costs_nothing(
        make_job: Any, tmp_path: Path, expire: bool) -> None:
    write_wav(tmp_path / "take.wav", seconds=1.0, freq=500)
    job = await make_job("file\ntake.wav\n", config())

    async def revoke_once_uploaded() -> None:
        await until(lambda: job.sim.stats.uploads_completed >= 1)
        job.sim.set_key("sim-key", KeySpec(active=False))

    first = await run_with(job, revoke_once_uploaded)
    assert first is not None and first.exit_code == 3
    (row,) = await job.rows()
    assert row.stage is Stage.PROJECT_CREATED  # completed at the host, never confirmed
    assert job.sim.stats.projects_confirmed == 0 and job.sim.stats.charges == 0
    job.sim.set_key("sim-key", KeySpec())
    if expire:  # and the session ran out meanwhile: the upload is confirmed all the same
        job.clock.advance(7200.0)
    before = job.sim.stats
    result = await job.run()
    assert result is not None and result.exit_code == 0, result.summary()
    stats = job.sim.stats
    assert stats.parts_received == before.parts_received  # nothing sent again
    assert (stats.projects_created, stats.uploads_completed, stats.projects_confirmed) == (1, 1, 1)
    assert (stats.charges, stats.extra_charges) == (1, 0)
    (row,) = await job.rows()
    assert restores(row)


# ------------------------------------------------------------------ faults of the upload host


async def test_each_part_is_retried_on_its_own_through_errors_and_lost_answers(
        make_job: Any, tmp_path: Path) -> None:
    # About 30 parts: a share of them meets each fault. Which part meets
    # which fault depends on the order parts arrive in, so the attempts
    # allowed must make a part that fails them all (0.44 ** 14 per part)
    # practically impossible, or the test would be flaky.
    files = [write_wav(tmp_path / f"t{i}.wav", seconds=2.5, freq=300 + 90 * i) for i in range(3)]
    job = await make_job("file\n" + "".join(f"{f.name}\n" for f in files),
                         config(part_error_rate=0.3, part_lost_rate=0.2, seed=3))
    result = await job.run(max_attempts=14)
    assert result is not None and result.exit_code == 0, result.summary()
    stats = job.sim.stats
    assert stats.part_errors_injected > 0 and stats.part_responses_lost > 0
    # A part whose answer was lost is sent again (the same number); nothing else is.
    assert 0 < stats.parts_resent <= stats.part_responses_lost * 2
    assert (stats.uploads_started, stats.projects_confirmed) == (3, 3)
    assert (stats.charges, stats.extra_charges) == (3, 0)


async def test_a_failed_upload_is_aborted_and_its_row_fails(make_job: Any,
                                                            tmp_path: Path) -> None:
    write_wav(tmp_path / "take.wav", seconds=1.0)
    job = await make_job("file\ntake.wav\n", config(part_error_rate=1.0))
    result = await job.run(max_attempts=2)
    assert result is not None and result.exit_code == 1
    (row,) = await job.rows()
    assert row.stage is Stage.FAILED and row.error is not None
    assert row.error["code"] == "internal_error" and row.error["httpStatus"] == 500
    stats = job.sim.stats
    assert (stats.uploads_started, stats.uploads_aborted, stats.charges) == (1, 1, 0)


async def test_a_file_over_the_upload_limit_fails_as_invalid_before_any_byte_is_sent(
        make_job: Any, tmp_path: Path) -> None:
    write_wav(tmp_path / "big.wav", seconds=2.0, freq=300)
    write_wav(tmp_path / "small.wav", seconds=0.1, freq=500)
    job = await make_job("file\nbig.wav\nsmall.wav\n", config(max_upload_bytes=8 * 1024))
    result = await job.run()
    assert result is not None and result.exit_code == 1
    rows = {Path(r.source_path).name: r for r in await job.rows()}
    big = rows["big.wav"]
    assert big.stage is Stage.FAILED and big.error is not None
    assert (big.error["code"], big.error["httpStatus"], big.error["field"]) == (
        "invalidRow", 413, "file")
    assert "big.wav" in big.error["message"] and "upload limit" in big.error["message"]
    assert rows["small.wav"].stage is Stage.COMPLETE
    stats = job.sim.stats
    assert (stats.uploads_started, stats.charges) == (1, 1)  # only the small one


# ------------------------------------------------------------------ what was sent is what was keyed


def rewrite_same_length(path: Path, freq: float) -> bytes:
    """Edit ``path`` in place: new audio, the same length (the size check cannot see it)."""
    old = path.read_bytes()
    fresh = write_wav(path.with_suffix(".tmp"), seconds=(len(old) - 44) / 16000, freq=freq)
    data = fresh.read_bytes()
    fresh.unlink()
    assert len(data) == len(old) and data != old
    with path.open("r+b") as f:
        f.write(data)
    return data


@pytest.mark.parametrize("model, when", [
    ("diffio-4.6-flash", "before the upload"),
    ("diffio-4.6-flash", "during the upload"),
    ("diffio-3.5", "before the upload"),
])
async def test_a_file_edited_after_it_was_keyed_is_never_posted_under_the_old_key(
        tmp_path: Path, model: str, when: str) -> None:
    take = write_wav(tmp_path / "take.wav", seconds=1.0, freq=300)
    old_sha = sha256(take)
    async with job_maker(tmp_path, model=model) as make:
        # API answers wait a little (real time), so the edit lands between the
        # keying of the row and the sending of its bytes.
        job = await make("file,prompt\ntake.wav,clean\n",
                         config(latency=(0.02, 0.02), part_latency=(0.01, 0.01)))

        async def edit() -> None:
            if when == "before the upload":
                await until(lambda: bool(job.ledger._db.rows))
            else:
                await until(lambda: job.sim.stats.parts_received >= 1)
            rewrite_same_length(take, freq=900)

        result = await run_with(job, edit)
        assert result is not None and result.exit_code == 0, result.summary()
        (row,) = await job.rows()
        new_sha = sha256(take)
        assert new_sha != old_sha and row.source_sha256 == new_sha
        # One charge, for the new bytes, on a project that holds them.
        stats = job.sim.stats
        assert (stats.charges, stats.extra_charges, stats.projects_created) == (1, 0, 2)
        (gen,) = job.sim.state.generations.values()
        assert gen.api_project_id == row.api_project_id
        assert hashlib.sha256(job.sim.state.projects[gen.api_project_id].audio or b"").hexdigest(
        ) == new_sha
        assert restores(row)
        changed = [e for e in await job.ledger.events(row.row_id) if e.event == "sourceChanged"]
        assert len(changed) == 1 and changed[0].detail["step"] == "upload"
        assert (changed[0].detail["oldSha256"], changed[0].detail["newSha256"]) == (
            old_sha, new_sha)
        if model == "diffio-4.6-flash":
            assert stats.uploads_aborted == 1 and stats.projects_confirmed == 1
        # The next run has nothing to do and pays nothing.
        again = await job.run()
        assert again is not None and again.exit_code == 0 and job.sim.stats.charges == 1


async def test_a_part_changed_on_disk_after_it_was_sent_is_caught_on_resume(
        make_job: Any, tmp_path: Path) -> None:
    take = write_wav(tmp_path / "take.wav", seconds=2.0, freq=300)
    original = take.read_bytes()
    job = await make_job("file\ntake.wav\n", config(latency=(0.02, 0.02),
                                                    part_latency=(0.005, 0.01)))

    async def edit_then_cut() -> None:
        # Edited once keyed: the first parts go up with the edited bytes.
        await until(lambda: bool(job.ledger._db.rows))
        rewrite_same_length(take, freq=900)
        await until(lambda: sum(map(len, job.ledger._db.parts.values())) >= 2)

    async with anyio.create_task_group() as tg:
        async def cut() -> None:
            await edit_then_cut()
            tg.cancel_scope.cancel()

        tg.start_soon(cut)
        await job.run()
    (row,) = await job.rows()
    assert row.stage is Stage.PROJECT_CREATED and row.upload_id is not None
    assert len(await job.ledger.upload_parts(row.row_id, row.upload_id)) >= 2
    # The file is put back as it was keyed: the next run's import sees nothing
    # new, but the parts already sent hold the other bytes.
    take.write_bytes(original)
    result = await job.run()
    assert result is not None and result.exit_code == 0, result.summary()
    (row,) = await job.rows()
    assert row.source_sha256 == hashlib.sha256(original).hexdigest()
    stats = job.sim.stats
    assert (stats.uploads_aborted, stats.projects_created, stats.projects_confirmed) == (1, 2, 1)
    assert (stats.charges, stats.extra_charges) == (1, 0)
    assert restores(row, original)
    (changed,) = [e for e in await job.ledger.events(row.row_id) if e.event == "sourceChanged"]
    assert "changed on disk since it was sent" in changed.detail["why"]


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("rows", ["project", "file"])
async def test_a_retired_model_halts_at_once_naming_the_supported_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, rows: str) -> None:
    for i in range(3):
        write_wav(tmp_path / f"t{i}.wav", seconds=0.3, freq=300 + 100 * i)
    text = ("apiProjectId\np-1\np-2\np-3\n" if rows == "project"
            else "file\nt0.wav\nt1.wav\nt2.wav\n")
    async with job_maker(tmp_path, model="diffio-3.5") as make:
        job = await make(text, config(auto_create_projects=True), api="current")
        result = await job.run()
        assert result is not None and result.exit_code == 3
        assert result.counts == {"pending": 3, "submitted": 0, "complete": 0, "failed": 0}
        assert isinstance(result.halt_error, ModelRetired)
        line = str(result.halt_error)
        assert "diffio-3.5" in line and "diffio-4.6-flash, diffio-4.6-pro" in line
        stats = job.sim.stats
        assert stats.charges == 0 and 1 <= stats.retired_model_refusals <= 3
        halted = [r for r in caplog.records if getattr(r, "event", "") == RUN_HALTED]
        assert len(halted) == 1 and "diffio-4.6-flash" in halted[0].getMessage()
        if rows == "file":
            return  # (uploads cut by the halt resume as any cut upload does)
        # Resumable: against an API that serves the model, the same rows go on
        # from where they were, and pay once each.
        job.sim.update_config(api="seed")
        result = await job.run()
        assert result is not None and result.exit_code == 0, result.summary()
        assert (job.sim.stats.charges, job.sim.stats.extra_charges) == (3, 0)


async def test_the_4_5_names_are_the_4_6_request_one_key_one_charge(
        make_job: Any, tmp_path: Path) -> None:
    write_wav(tmp_path / "take.wav", seconds=0.5)
    job = await make_job("file,model\ntake.wav,diffio-4.5-flash\n", config())
    first = await job.run()
    assert first is not None and first.exit_code == 0
    (row,) = await job.rows()
    key = row.idempotency_key
    # The manifest names the 4.6 model now: the same request, nothing to do.
    job.manifest.write_text("file,model\ntake.wav,diffio-4.6-flash\n")
    again = await job.run()
    assert again is not None and again.exit_code == 0
    rows = await job.rows()
    assert [r.idempotency_key for r in rows if not r.retired] == [key]
    assert (job.sim.stats.charges, job.sim.stats.generations_created) == (1, 1)


# ------------------------------------------------------------------ the API's queue


async def test_queue_positions_are_kept_shown_in_progress_and_in_status(
        make_job: Any, tmp_path: Path) -> None:
    job = await make_job("apiProjectId\n" + "".join(f"p-{i}\n" for i in range(6)),
                         SimConfig(duration=(100.0, 120.0), auto_create_projects=True))
    ledger = SqliteLedger(tmp_path / "l.sqlite", wall=job.clock)
    await ledger.open(RunInfo.start("test"))

    def polled_all() -> bool:
        return job.sim.stats.status_count("get_generation_progress", 200) >= 6

    try:
        assert await job.run(ledger=ledger, stop_when=polled_all) is None
    finally:
        await ledger.close(130)
    rows = [row async for row in _rows(tmp_path / "l.sqlite")]
    positions = sorted(r.queue_position for r in rows if r.queue_position is not None)
    assert positions and positions[0] >= 1, [r.queue_position for r in rows]
    out = io.StringIO()
    assert await status_main(str(tmp_path / "l.sqlite"), True, out) == 0
    queued = json.loads(out.getvalue())["queued"]
    assert queued == {"count": len(positions), "front": positions[0], "back": positions[-1]}
    out = io.StringIO()
    await status_main(str(tmp_path / "l.sqlite"), False, out)
    assert f"queued at the API: {len(positions)} generations" in out.getvalue()


async def _rows(path: Path) -> AsyncIterator[Any]:
    ledger = SqliteLedger(path)
    await ledger.open(RunInfo.reader(), lock=False)
    try:
        async for row in ledger.rows():
            yield row
    finally:
        await ledger.close()


def test_the_progress_line_shows_the_queue_and_the_upload_time_at_the_cap() -> None:
    stats = RunStats(rows_total=10)
    assert "queued" not in progress_line(stats) and "uploads" not in progress_line(stats, 1024)
    stats.queue.update({"r1": 4, "r2": 2})
    stats.upload_bytes, stats.uploaded_bytes = 10 * 2**20, 4 * 2**20
    line = progress_line(stats, 2**20)
    assert "2 queued at the API (next at position 2)" in line
    assert "uploads 6.0 MiB left (~6s at 1.0 MiB/s)" in line
    assert "uploads" not in progress_line(stats)  # no cap, no transfer time
    record = json.loads(progress_json(stats, 2**20))
    assert (record["queued"], record["queueFront"], record["uploadBytesLeft"],
            record["uploadSecondsLeft"]) == (2, 2, 6 * 2**20, 6.0)

"""A logical request's identity, in-process: row order, run history and ids never pay twice.

The same runner harness as tests/test_runner.py (real stages, a memory
ledger, the simulator on loopback, one fake clock). Each test lives a job
over several "nights" (a run, then the manifest or its files change, then
another run on the same ledger) and asserts the simulator's charges and the
outputs on disk: who pays does not depend on where a row stands, on which run
sent its request or on the row that first asked for it.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import write_wav
from runner_harness import Job, job_maker

from batcher.model import RunInfo, Stage
from batcher.run import RunResult
from batcher.simulator import SimConfig, restored_audio

pytestmark = pytest.mark.anyio

QUICK = SimConfig(duration=(3.0, 9.0), auto_create_projects=True)
SLOW = SimConfig(duration=(30.0, 40.0), auto_create_projects=True)


@pytest.fixture
async def make_job(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    async with job_maker(tmp_path) as make:
        yield make


async def night(job: Job, manifest: str | None = None, *,
                stop_when: Callable[[], bool] | None = None, **changes: Any
                ) -> RunResult | None:
    """One run as a new process would make it: the ledger opened afresh."""
    if manifest is not None:
        job.manifest.write_text(manifest)
    await job.ledger.close(0)
    await job.ledger.open(RunInfo.start("test"))
    return await job.run(stop_when=stop_when, **changes)


async def by_source(job: Job) -> dict[str, Any]:
    return {Path(r.source_path).relative_to(job.folder).as_posix(): r
            for r in await job.rows() if r.source_path}


def assert_restores(row: Any, source: Path) -> None:
    """The row is complete and its output, a file of its own, restores ``source`` now."""
    assert row.stage is Stage.COMPLETE, row
    output = Path(row.output_path)
    assert output.is_file() and not output.is_symlink(), output
    assert output.read_bytes() == restored_audio(source.read_bytes()), row.row_id


def charges(job: Job) -> tuple[int, int]:
    return job.sim.stats.charges, job.sim.stats.extra_charges


def clean(result: RunResult | None) -> None:
    assert result is not None and result.exit_code == 0, result and result.summary()


# ------------------------------------------------------------------ row order


async def test_a_copy_listed_above_a_request_paid_last_night_follows_it(
        make_job: Any, tmp_path: Path) -> None:
    take = write_wav(tmp_path / "take.wav", freq=300)
    job = await make_job("file,prompt\ntake.wav,clean\n", QUICK)
    clean(await job.run())
    copy = tmp_path / "archive" / "copy.wav"
    copy.parent.mkdir()
    shutil.copyfile(take, copy)
    clean(await night(job, "file,prompt\narchive/copy.wav,clean\ntake.wav,clean\n"))
    rows = await by_source(job)
    assert rows["archive/copy.wav"].leader_row_id == rows["take.wav"].row_id
    assert_restores(rows["archive/copy.wav"], copy)
    assert_restores(rows["take.wav"], take)
    assert charges(job) == (1, 0)


async def test_a_renamed_file_keeps_its_request_wherever_it_was(
        make_job: Any, tmp_path: Path) -> None:
    # The row's derived id follows the path, so the renamed file is a new
    # row: it takes over the old row's request (in flight when killed).
    write_wav(tmp_path / "take.wav", freq=300)
    job = await make_job("file,prompt\ntake.wav,clean\n", SLOW)
    assert await job.run(stop_when=lambda: job.sim.stats.generations_created >= 1) is None
    (tmp_path / "day2").mkdir()
    moved = (tmp_path / "take.wav").rename(tmp_path / "day2" / "take.wav")
    clean(await night(job, "file,prompt\nday2/take.wav,clean\n"))
    rows = await by_source(job)
    assert_restores(rows["day2/take.wav"], moved)
    assert charges(job) == (1, 0)


# ------------------------------------------------------------------ explicit ids


@pytest.mark.parametrize("change", ["file", "prompt", "project"])
async def test_a_changed_request_under_an_explicit_id_is_sent_as_a_new_one(
        make_job: Any, tmp_path: Path, change: str) -> None:
    write_wav(tmp_path / "old.wav", freq=300)
    new = write_wav(tmp_path / "new.wav", seconds=0.7, freq=500)
    first = ("id,apiProjectId\njob-1,p-one\n" if change == "project"
             else "id,file,prompt\njob-1,old.wav,clean\n")
    job = await make_job(first, QUICK)
    clean(await job.run())
    (before,) = await job.rows()
    second = {"file": "id,file,prompt\njob-1,new.wav,clean\n",
              "prompt": "id,file,prompt\njob-1,old.wav,less hiss\n",
              "project": "id,apiProjectId\njob-1,p-two\n"}[change]
    clean(await night(job, second))
    (after,) = await job.rows()
    assert after.row_id == "job-1" and after.idempotency_key != before.idempotency_key
    assert after.generation_id != before.generation_id
    assert charges(job) == (2, 0)
    events = [e.event for e in await job.ledger.events("job-1")]
    assert "requestChanged" in events
    if change == "file":
        assert after.source_path == str(new)
        assert_restores(after, new)
    if change == "project":
        assert after.api_project_id == "p-two"


async def test_an_explicit_output_named_twice_fails_the_later_row_only(
        make_job: Any, tmp_path: Path) -> None:
    a = write_wav(tmp_path / "a.wav", freq=300)
    write_wav(tmp_path / "b.wav", freq=400)
    job = await make_job("file,output\na.wav,mix/final.mp3\nb.wav,./mix/x/../final.mp3\n", QUICK)
    result = await job.run()
    assert result is not None and result.exit_code == 1
    rows = {r.line: r for r in await job.rows()}
    assert_restores(rows[1], a)
    error = rows[2].error or {}
    assert rows[2].stage is Stage.FAILED and error["code"] == "invalidRow"
    assert "row 2" in error["message"] and "row 1" in error["message"]
    assert (job.sim.stats.projects_created, *charges(job)) == (1, 1, 0)


async def test_rows_naming_one_file_under_their_own_ids_get_outputs_of_their_own(
        make_job: Any, tmp_path: Path) -> None:
    take = write_wav(tmp_path / "take.wav", freq=300)
    job = await make_job("id,file,prompt\n,take.wav,clean\nmine,take.wav,clean\n"
                         "hiss,take.wav,less hiss\n", QUICK)
    clean(await job.run())
    rows = await job.rows()
    assert len({r.output_path for r in rows}) == 3
    for row in rows:
        assert_restores(row, take)
    assert charges(job) == (2, 0)  # two prompts; the second "clean" row follows


# ------------------------------------------------------------------ followers


async def test_a_follower_whose_leader_left_the_manifest_takes_its_request_over(
        make_job: Any, tmp_path: Path) -> None:
    write_wav(tmp_path / "take.wav", freq=300)
    copy = tmp_path / "copies" / "take.wav"
    copy.parent.mkdir()
    shutil.copyfile(tmp_path / "take.wav", copy)
    job = await make_job("file,prompt\ntake.wav,clean\ncopies/take.wav,clean\n", SLOW)
    assert await job.run(stop_when=lambda: job.sim.stats.generations_created >= 1) is None
    clean(await night(job, "file,prompt\ncopies/take.wav,clean\n"))
    rows = await by_source(job)
    follower = rows["copies/take.wav"]
    assert follower.leader_row_id is None
    assert "tookOver" in [e.event for e in await job.ledger.events(follower.row_id)]
    assert_restores(follower, copy)
    assert charges(job) == (1, 0)


async def test_a_follower_keeps_its_own_audio_when_its_leader_is_edited(
        make_job: Any, tmp_path: Path) -> None:
    take = write_wav(tmp_path / "take.wav", freq=300)
    copy = tmp_path / "copies" / "take.wav"
    copy.parent.mkdir()
    shutil.copyfile(take, copy)
    job = await make_job("file,prompt\ntake.wav,clean\ncopies/take.wav,clean\n", SLOW)
    assert await job.run(stop_when=lambda: job.sim.stats.generations_created >= 1) is None
    write_wav(take, freq=900)
    clean(await night(job))
    rows = await by_source(job)
    assert_restores(rows["copies/take.wav"], copy)
    assert_restores(rows["take.wav"], take)
    # The original audio (posted before the edit) and the edited one.
    assert charges(job) == (2, 0)


async def test_an_edited_follower_is_a_request_of_its_own_not_a_reused_key(
        make_job: Any, tmp_path: Path) -> None:
    take = write_wav(tmp_path / "take.wav", freq=300)
    copy = tmp_path / "copies" / "take.wav"
    copy.parent.mkdir()
    shutil.copyfile(take, copy)
    job = await make_job("file,prompt\ntake.wav,clean\ncopies/take.wav,clean\n", QUICK)
    clean(await job.run())
    write_wav(copy, freq=900)
    clean(await night(job))
    clean(await night(job))  # and stays so
    rows = await by_source(job)
    assert rows["copies/take.wav"].leader_row_id is None
    assert_restores(rows["copies/take.wav"], copy)
    assert_restores(rows["take.wav"], take)
    assert charges(job) == (2, 0)


async def test_a_follower_of_a_failed_leader_follows_it_through_retry_failed(
        make_job: Any, tmp_path: Path) -> None:
    take = write_wav(tmp_path / "take.wav", freq=300)
    copy = tmp_path / "copy.wav"
    shutil.copyfile(take, copy)
    job = await make_job("file,prompt\ntake.wav,clean\ncopy.wav,clean\n",
                         SimConfig(duration=(3.0, 9.0), failure_rate=1.0))
    result = await job.run()
    assert result is not None and result.counts["failed"] == 2
    job.sim.update_config(failure_rate=0.0)
    clean(await night(job, retry_failed=True))
    rows = await by_source(job)
    assert_restores(rows["copy.wav"], copy)
    assert_restores(rows["take.wav"], take)
    assert job.sim.stats.charges == 2  # the failed generation and its deliberate retry

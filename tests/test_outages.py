"""Outages of batcher's own infrastructure, in process and on the fake clock.

The API host behind a proxy that goes away (the runner's breakers wait on
fake time), a ledger whose writes fail for a while (the patient ledger waits
them out), and the error mapping of SQLite's and asyncpg's transient
failures. The same faults with real processes: tests/test_infra_e2e.py.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from fakeclock import FakeClock
from infra_faults import LoopProxy
from runner_harness import job_maker, until

from batcher.breaker import BreakerConfig, Breakers, BreakerState, CircuitBreaker
from batcher.errors import (
    ApiUnavailable,
    ConfigError,
    LedgerError,
    LedgerLocked,
    LedgerUnavailable,
    LedgerUnreachable,
    TransitionConflict,
    exit_code_for,
)
from batcher.ledger import MemoryLedger
from batcher.ledger.base import NextMove
from batcher.ledger.patient import PatientLedger, patient
from batcher.ledger.writer import sqlite_error
from batcher.model import Kind, LedgerRow, NewRow, RunInfo, Stage, Update
from batcher.ops.status import run_state
from batcher.settings import parse_duration
from batcher.simulator import SimConfig

pytestmark = pytest.mark.anyio

ROWS = "apiProjectId,prompt\n" + "".join(f"p-{i},x\n" for i in range(12))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def make_job(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    # Everyone may wait on one probe through the proxy: let its answer arrive
    # before fake time jumps to the patience's end.
    async with job_maker(tmp_path, grace=0.05) as make:
        yield make


def _created(job: Any) -> int:
    return int(job.sim.stats.generations_created)


def _counts(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def _charges(job: Any) -> int:
    return int(sum(job.sim.stats.charges_by_key.values()))


# -- the API host ------------------------------------------------------------------


async def test_an_api_outage_pauses_the_run_and_no_row_fails(make_job: Any) -> None:
    job = await make_job(ROWS, SimConfig(duration=(3.0, 9.0), auto_create_projects=True))
    proxy = LoopProxy(int(job.sim.base_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.up()
    breakers = Breakers(job.clock, BreakerConfig(patience=600.0))

    async def outage() -> None:
        await until(lambda: _created(job) >= 4)  # some rows submitted
        proxy.down()
        await job.clock.sleep(120.0)
        await proxy.up()

    async with anyio.create_task_group() as tg:
        tg.start_soon(outage)
        result = await job.run(base_url=proxy.url(job.sim.base_url), breakers=breakers,
                               outage_patience=600.0)
    assert result is not None and result.exit_code == 0, result
    assert _counts(await job.stage_counts()) == {"complete": 12}
    assert _charges(job) == 12
    [breaker] = list(breakers)
    assert breaker.opened >= 1 and breaker.paused_seconds > 0
    proxy.down()


async def test_an_api_outage_past_the_patience_halts_with_exit_3_and_the_rerun_finishes(
        make_job: Any) -> None:
    job = await make_job(ROWS, SimConfig(duration=(3.0, 9.0), auto_create_projects=True))
    proxy = LoopProxy(int(job.sim.base_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.up()
    url = proxy.url(job.sim.base_url)

    async def outage() -> None:
        await until(lambda: _created(job) >= 4)
        proxy.down()

    async with anyio.create_task_group() as tg:
        tg.start_soon(outage)
        result = await job.run(base_url=url, breakers=Breakers(
            job.clock, BreakerConfig(patience=60.0)), outage_patience=60.0)
    assert result is not None and result.exit_code == 3
    assert isinstance(result.halt_error, ApiUnavailable)
    assert f"127.0.0.1:{proxy.port}" in str(result.halt_error)
    counts = _counts(await job.stage_counts())
    assert "failed" not in counts, counts
    charged = _charges(job)
    # The same run, the host back: it finishes and buys only what it never bought.
    await proxy.up()
    again = await job.run(base_url=url, breakers=Breakers(job.clock), outage_patience=60.0)
    assert again is not None and again.exit_code == 0
    assert _counts(await job.stage_counts()) == {"complete": 12}
    assert _charges(job) == 12 and charged <= 12
    assert job.sim.stats.extra_charges == 0
    proxy.down()


async def test_one_request_unanswered_past_the_patience_halts_even_below_the_threshold(
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock, host="api.test", threshold=5, patience=30.0)
    async with breaker.request("only") as verdict:
        verdict.unreachable()
    assert breaker.state is BreakerState.CLOSED and breaker.suspects_outage()
    await clock.advance_to(31.0)
    with pytest.raises(ApiUnavailable, match=r"api\.test has not answered for 31 s"):
        async with breaker.request("only"):
            pass
    # Any answer clears the suspicion.
    other = CircuitBreaker(clock, host="h", patience=30.0)
    async with other.request("a") as verdict:
        verdict.unreachable()
    async with other.request("b") as verdict:
        verdict.answered()
    assert not other.suspects_outage()


# -- the ledger ----------------------------------------------------------------------


class FlakyLedger(MemoryLedger):
    """A memory ledger whose calls fail while ``down``; with ``lose_answer`` a
    transition commits, then fails as a dropped connection would."""

    down = False
    lose_answer = False

    def _check(self) -> None:
        if self.down:
            raise LedgerUnreachable("ledger flaky: cannot update: ConnectionDoesNotExistError")

    async def transition(self, row_id: str, expect: Stage | frozenset[Stage], to: Stage,
                         update: Update | None = None, **kw: Any) -> LedgerRow:
        self._check()
        moved = await super().transition(row_id, expect, to, update, **kw)
        if self.lose_answer:
            self.lose_answer = False
            raise LedgerUnreachable("ledger flaky: the answer was lost")
        return moved

    async def get(self, row_id: str) -> LedgerRow | None:
        self._check()
        return await super().get(row_id)


async def _one_row(clock: FakeClock) -> tuple[FlakyLedger, LedgerRow]:
    ledger = FlakyLedger(wall=clock)
    await ledger.open(RunInfo.start("test"))
    [row] = await ledger.import_rows([NewRow(
        row_id="r-1", line=1, kind=Kind.API_PROJECT, idempotency_key="k", model_key="m",
        api_project_id="p")])
    return ledger, row


async def test_the_patient_ledger_waits_out_an_outage_and_a_lost_answer_counts_as_done(
) -> None:
    clock = FakeClock()
    async with clock.autojump():
        inner, row = await _one_row(clock)
        ledger = patient(inner, clock=clock, patience=60.0)
        inner.down = True

        async def back() -> None:
            await clock.sleep(20.0)
            inner.down = False

        async with anyio.create_task_group() as tg:
            tg.start_soon(back)
            waited = clock.now()
            moved = await ledger.transition("r-1", Stage.PENDING, Stage.SUBMITTED,
                                            {"generation_id": "g-1"}, event="submitted",
                                            current=row)
        assert moved.stage is Stage.SUBMITTED and moved.generation_id == "g-1"
        assert clock.now() - waited >= 20.0
        assert isinstance(ledger, PatientLedger) and ledger.down_since is None
        # Committed, but the answer lost: the retry finds the row where it was going.
        inner.lose_answer = True
        done = await ledger.transition("r-1", Stage.SUBMITTED, Stage.COMPLETE, {},
                                       event="complete", current=moved)
        assert done.stage is Stage.COMPLETE
        # A conflict that is not a lost answer stays a conflict.
        with pytest.raises(TransitionConflict):
            await ledger.transition("r-1", Stage.PENDING, Stage.SUBMITTED, {},
                                    event="submitted")


async def test_a_lost_answer_to_a_double_move_counts_as_done_where_the_second_went() -> None:
    clock = FakeClock()
    async with clock.autojump():
        inner, row = await _one_row(clock)
        ledger = patient(inner, clock=clock, patience=60.0)
        inner.lose_answer = True
        done = await ledger.transition(
            "r-1", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g-1"}, event="submitted",
            current=row, then=NextMove(Stage.COMPLETE, {"api_status": "complete"}, "complete"))
        assert done.stage is Stage.COMPLETE and done.generation_id == "g-1"
        assert [e.event for e in await inner.events("r-1")] == ["imported", "submitted",
                                                                 "complete"]


async def test_the_patient_ledger_gives_up_after_the_patience_naming_the_ledger() -> None:
    clock = FakeClock()
    async with clock.autojump():
        inner, _ = await _one_row(clock)
        ledger = patient(inner, clock=clock, patience=30.0)
        inner.down = True
        with pytest.raises(LedgerUnavailable) as caught:
            await ledger.get("r-1")
        assert clock.now() >= 30.0
        err = caught.value
        assert inner.description in str(err) and "run the same command again" in str(err)
        assert err.halts_run and exit_code_for(err, sent=True) == 3
        # Submissions wait for the ledger, and give up with it.
        with pytest.raises(LedgerUnavailable):
            await ledger.wait_available()


def test_exit_2_only_when_nothing_was_sent() -> None:
    broken = LedgerError("ledger x: cannot update row r-1: syntax")
    assert exit_code_for(broken, sent=False) == 2
    assert exit_code_for(broken, sent=True) == 3
    assert exit_code_for(ConfigError("bad flag"), sent=False) == 2
    assert exit_code_for(LedgerLocked("x", "pid 1"), sent=False) == 4
    assert exit_code_for(ApiUnavailable("down", host="h"), sent=True) == 3


def test_sqlite_locked_and_full_are_transient_and_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.ledger.sqlite"
    full = sqlite_error(sqlite3.OperationalError("database or disk is full"),
                        f"cannot write ledger {path}")
    assert isinstance(full, LedgerUnreachable) and str(path) in str(full)
    assert "database or disk is full" in str(full)
    locked = sqlite_error(sqlite3.OperationalError("database is locked"), "cannot read")
    assert isinstance(locked, LedgerUnreachable)
    broken = sqlite_error(sqlite3.IntegrityError("UNIQUE constraint failed"), "cannot write")
    assert type(broken) is LedgerError


@pytest.mark.parametrize("exc", [
    asyncpg.InternalClientError("cannot switch to state 15"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    ConnectionRefusedError(111, "Connect call failed"),
    TimeoutError(),
])
def test_transient_asyncpg_errors_become_ledger_unreachable_without_the_password(
        exc: BaseException) -> None:
    from batcher.ledger.postgres import PostgresLedger

    ledger = PostgresLedger("postgresql://batcher:s3cret@db.example:5432/jobs")
    with pytest.raises(LedgerUnreachable) as caught, ledger._translate("update row r-1"):
        raise exc
    assert "s3cret" not in str(caught.value)
    assert "db.example" in str(caught.value) and "update row r-1" in str(caught.value)


def test_a_postgres_error_that_does_not_pass_stays_a_ledger_error() -> None:
    from batcher.ledger.postgres import PostgresLedger

    ledger = PostgresLedger("postgresql://batcher@db.example/jobs")
    with pytest.raises(LedgerError) as caught, ledger._translate("update row r-1"):
        raise asyncpg.UndefinedTableError("relation does not exist")
    assert not isinstance(caught.value, LedgerUnreachable)


# -- status and settings -------------------------------------------------------------


def _a_dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_status_tells_a_live_run_from_a_dead_one() -> None:
    here = "this-host"
    dead_pid = _a_dead_pid()
    base = {"run_id": "r", "started_at": 1.0, "host": here}
    assert run_state({**base, "pid": os.getpid()}, host=here) == "running"
    assert run_state({**base, "pid": dead_pid}, host=here) == "died"
    assert run_state({**base, "pid": 1, "ended_at": 5.0, "exit_code": 0}, host=here) == "ended"
    assert run_state({**base, "pid": 1, "ended_at": 5.0, "exit_code": None},
                     host=here) == "interrupted"
    elsewhere = {**base, "host": "other", "pid": 7}
    assert run_state(elsewhere, host=here) == "unknown"
    assert run_state(elsewhere, host=here, live_workers=[]) == "died"
    assert run_state(elsewhere, host=here, live_workers=[{"run_id": "r"}]) == "running"


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), (" 2M ", 120.0)])
def test_outage_patience_reads_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "ten minutes", "-5s", "inf"])
def test_outage_patience_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


async def test_status_shows_a_killed_run_as_died_without_an_eta(tmp_path: Path) -> None:
    import io
    import socket

    from batcher.ledger import SqliteLedger
    from batcher.ops.status import status_main

    dead_pid = _a_dead_pid()
    path = tmp_path / "job.ledger.sqlite"
    ledger = SqliteLedger(path)
    # A run recorded by a process that is gone and never recorded its end.
    await ledger.open(RunInfo(run_id="r-dead", pid=dead_pid, host=socket.gethostname(),
                              started_at=1_790_000_000.0, command="run job.csv"))
    try:
        await ledger.import_rows([NewRow(row_id=f"r-{i}", line=i, kind=Kind.API_PROJECT,
                                         idempotency_key=f"k-{i}", model_key="m",
                                         api_project_id=f"p-{i}") for i in range(1, 4)])
        out = io.StringIO()
        assert await status_main(str(path), False, out) == 0
        text = out.getvalue()
        assert f"(pid {dead_pid}), died" in text and "ETA" not in text, text
        as_json = io.StringIO()
        await status_main(str(path), True, as_json)
        assert '"state":"died"' in as_json.getvalue()
    finally:
        await ledger.close(None)


async def test_a_request_failing_alone_while_the_host_answers_others_is_not_an_outage(
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock, host="api.test", threshold=5)

    async def once(key: str, *, ok: bool) -> bool:
        async with breaker.request(key) as verdict:
            if ok:
                verdict.answered()
            else:
                verdict.unreachable()
        return verdict.outage

    # Nobody answered since "a" first failed: maybe an outage.
    assert await once("a", ok=False) is True
    clock.advance(1.0)
    assert await once("a", ok=False) is True
    # The host answers another request: "a" failing again is its own problem.
    await once("b", ok=True)
    clock.advance(1.0)
    assert await once("a", ok=False) is False
    # A request failing for the first time after that may be an outage again.
    assert await once("c", ok=False) is True

"""What only the SQLite ledger has: a file, a lock, migrations, group commits.

Crash and lock tests use real child processes (``python -c CHILD``) and real
signals; nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batcher.errors import ConfigError, LedgerError, LedgerLocked, TransitionConflict
from batcher.ledger import MemoryLedger, SqliteLedger, open_ledger
from batcher.ledger.lock import RunLock, lock_path_for
from batcher.ledger.migrations import BOOTSTRAP_SQL, load_migrations, pending_migrations
from batcher.model import Kind, NewRow, RunInfo, Stage


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def run_info(run_id: str = "parent") -> RunInfo:
    return RunInfo(run_id, os.getpid(), socket.gethostname(), time.time(), "pytest")


def new_row(i: int) -> NewRow:
    return NewRow(f"r{i}", i, Kind.API_PROJECT, f"key-{i}", "diffio-3.5", api_project_id=f"p{i}")


def tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Read the file with plain sqlite3, as an outsider would."""
    with sqlite3.connect(path) as conn:
        return {
            "migrations": conn.execute(
                "SELECT version, name, applied_at FROM ledger_migrations"
            ).fetchall(),
            "tables": conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            ).fetchall(),
            "indexes": conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'ledger_%'"
            ).fetchall(),
        }


# -- child processes ------------------------------------------------------------

CHILD = r"""
import asyncio, os, signal, socket, sys, time
from pathlib import Path
from batcher.errors import LedgerLocked
from batcher.ledger import SqliteLedger
from batcher.model import Kind, NewRow, RunInfo, Stage

async def main(path: str, mode: str) -> None:
    led = SqliteLedger(Path(path))
    run = RunInfo(f"child-{os.getpid()}", os.getpid(), socket.gethostname(), time.time(), mode)
    try:
        await led.open(run)
    except LedgerLocked as exc:
        print(f"locked: {exc}", flush=True)
        sys.exit(4)
    if mode == "crash":
        await led.import_rows([NewRow("a", 1, Kind.API_PROJECT, "k", "m", api_project_id="p")])
        await led.transition("a", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "gen-a"},
                             event="submitted")
        # Awaited means committed: nothing may be lost from here on.
        os.kill(os.getpid(), signal.SIGKILL)
    print("ready", flush=True)
    n = 0
    for line in iter(sys.stdin.readline, ""):
        if line.strip() == "write":
            n += 1
            await led.import_rows(
                [NewRow(f"w{n}", n, Kind.API_PROJECT, "k", "m", api_project_id="p")])
            await led.transition(f"w{n}", Stage.PENDING, Stage.PROJECT_CREATED, event="child")
            print("wrote", flush=True)
        elif line.strip() == "quit":
            break
    await led.close(0)
    print("closed", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


class Child:
    """A child process running CHILD, with line-by-line stdout and a timeout."""

    def __init__(self, path: Path, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 30.0) -> str:
        return self._lines.get(timeout=timeout)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def spawn(children: list[Child], path: Path, mode: str) -> Child:
    child = Child(path, mode)
    children.append(child)
    return child


# -- locking --------------------------------------------------------------------


@pytest.mark.anyio
async def test_second_process_is_refused_at_once_naming_the_holder(
    tmp_path: Path, children: list[Child]
) -> None:
    path = tmp_path / "job.ledger.sqlite"
    holder = spawn(children, path, "hold")
    assert holder.line() == "ready"

    started = time.monotonic()
    with pytest.raises(LedgerLocked) as info:
        await SqliteLedger(path).open(run_info())
    assert time.monotonic() - started < 2.0  # at once, not after a busy timeout
    message = str(info.value)
    assert f"pid {holder.proc.pid}" in message
    assert socket.gethostname() in message
    assert "started 2" in message  # an ISO date
    assert info.value.path == str(path)

    # a second child is refused the same way (exit 4 is the contract's code)
    other = spawn(children, path, "hold")
    assert other.line().startswith(f"locked: ledger {path} is in use by pid {holder.proc.pid}")
    assert other.wait() == 4

    holder.send("quit")
    assert holder.line() == "closed"
    assert holder.wait() == 0
    led = SqliteLedger(path)
    await led.open(run_info())  # free again after a clean close
    await led.close(0)


@pytest.mark.anyio
async def test_lock_of_a_killed_run_is_taken_over(tmp_path: Path, children: list[Child]) -> None:
    path = tmp_path / "job.ledger.sqlite"
    holder = spawn(children, path, "hold")
    assert holder.line() == "ready"
    holder.send("write")
    assert holder.line() == "wrote"
    holder.proc.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    assert orjson.loads(lock_path_for(path).read_bytes())["pid"] == holder.proc.pid

    led = SqliteLedger(path)
    await led.open(run_info("after-kill"))
    info = orjson.loads(lock_path_for(path).read_bytes())
    assert (info["pid"], info["run_id"]) == (os.getpid(), "after-kill")
    row = await led.get("w1")
    assert row is not None and row.stage is Stage.PROJECT_CREATED
    runs = await led.runs()
    assert [r["run_id"] for r in runs] == [f"child-{holder.proc.pid}", "after-kill"]
    assert runs[0]["ended_at"] is None  # it never ended cleanly
    await led.close(0)


@pytest.mark.anyio
async def test_reader_works_while_another_process_holds_and_writes(
    tmp_path: Path, children: list[Child]
) -> None:
    path = tmp_path / "job.ledger.sqlite"
    holder = spawn(children, path, "hold")
    assert holder.line() == "ready"
    reader = SqliteLedger(path)
    await reader.open(run_info("status"), lock=False)
    assert [r async for r in reader.rows()] == []
    for n in (1, 2, 3):
        holder.send("write")
        assert holder.line() == "wrote"
        assert [r.row_id async for r in reader.rows()] == [f"w{i}" for i in range(1, n + 1)]
    counts = await reader.counts()
    assert counts[Stage.PROJECT_CREATED] == 3
    await reader.close()
    holder.send("quit")
    assert holder.line() == "closed"


@pytest.mark.anyio
async def test_two_ledgers_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    first = SqliteLedger(path)
    await first.open(run_info("one"))
    with pytest.raises(LedgerLocked, match=f"pid {os.getpid()}"):
        await SqliteLedger(path).open(run_info("two"))
    await first.close(0)
    assert lock_path_for(path).read_bytes() == b""  # no stale holder named after release
    second = SqliteLedger(path)
    await second.open(run_info("two"))
    await second.close(0)


def test_run_lock_reports_the_holder_and_is_reentrant_safe(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "x.sqlite")
    assert lock.holder() is None and not lock.held
    lock.acquire(run_info("r"))
    lock.acquire(run_info("r"))  # already held: no-op
    assert lock.held and lock.holder() == {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": pytest.approx(time.time(), abs=60),
        "run_id": "r",
    }
    lock.release()
    lock.release()
    assert not lock.held


# -- durability -----------------------------------------------------------------


@pytest.mark.anyio
async def test_an_awaited_transition_survives_sigkill(
    tmp_path: Path, children: list[Child]
) -> None:
    path = tmp_path / "job.ledger.sqlite"
    child = spawn(children, path, "crash")
    assert child.wait() == -signal.SIGKILL
    led = SqliteLedger(path)
    await led.open(run_info("resume"))
    row = await led.get("a")
    assert row is not None
    assert (row.stage, row.generation_id) == (Stage.SUBMITTED, "gen-a")
    events = [(e.event, e.to_stage) for e in await led.events("a")]
    assert events == [("imported", Stage.PENDING), ("submitted", Stage.SUBMITTED)]
    await led.close(0)


@pytest.mark.anyio
async def test_close_flushes_writes_already_queued(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    led = SqliteLedger(path)
    await led.open(run_info("one"))
    await led.import_rows([new_row(i) for i in range(100)])
    tasks = [
        asyncio.ensure_future(
            led.transition(f"r{i}", Stage.PENDING, Stage.PROJECT_CREATED, event="p"))
        for i in range(100)
    ]
    await asyncio.sleep(0)  # every task has queued its write
    await led.close(3)
    assert all(t.result().stage is Stage.PROJECT_CREATED for t in tasks)
    with pytest.raises(LedgerError, match="not open"):
        await led.transition("r1", Stage.PROJECT_CREATED, Stage.UPLOADED, event="late")
    again = SqliteLedger(path)
    await again.open(run_info("two"), lock=False)
    assert (await again.counts())[Stage.PROJECT_CREATED] == 100
    assert (await again.runs())[0]["exit_code"] == 3
    await again.close()


# -- group commit ---------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_transitions_share_commits_and_a_conflict_fails_alone(
    tmp_path: Path,
) -> None:
    led = SqliteLedger(tmp_path / "l.sqlite")
    await led.open(run_info())
    await led.import_rows([new_row(i) for i in range(400)])
    commits_before, jobs_before = led.commit_stats
    moves = [
        led.transition(f"r{i}", Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": "x"},
                       event="p")
        for i in range(400)
    ]
    stale = led.transition("r7", Stage.COMPLETE, Stage.GENERATED, event="stale")
    results = await asyncio.gather(*moves[:200], stale, *moves[200:], return_exceptions=True)
    conflicts = [r for r in results if isinstance(r, BaseException)]
    assert len(conflicts) == 1 and isinstance(conflicts[0], TransitionConflict)
    assert conflicts[0].actual in ("pending", "project")
    commits, jobs = led.commit_stats
    assert jobs - jobs_before == 401
    assert commits - commits_before < 100  # 401 callers, far fewer transactions
    assert (await led.counts())[Stage.PROJECT_CREATED] == 400
    await led.close(0)
    # The batch that held the conflict ran again job by job after a rollback:
    # every other move is written once, and the refused one not at all.
    with contextlib.closing(sqlite3.connect(tmp_path / "l.sqlite")) as conn:
        moved = conn.execute("SELECT event, count(*), count(DISTINCT row_id) FROM ledger_events"
                             " WHERE event IN ('p', 'stale') GROUP BY event").fetchall()
    assert moved == [("p", 400, 400)]


@pytest.mark.anyio
async def test_the_writer_lingers_only_while_busy(tmp_path: Path) -> None:
    from batcher.ledger.writer import GroupCommitWriter

    conn = sqlite3.connect(tmp_path / "w.sqlite", isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE t (n INTEGER)")
    writer = GroupCommitWriter(conn, 64, "test-writer", linger=1.0)

    def insert(n: int) -> Any:
        return lambda c: c.execute("INSERT INTO t VALUES (?)", (n,)).rowcount

    # Three jobs queued before the thread starts are one batch: the writer is busy.
    first = [writer.submit(insert(n)) for n in range(3)]
    writer.start()
    assert await asyncio.gather(*first) == [1, 1, 1]
    assert (writer.commits, writer.jobs) == (1, 3)
    started = time.monotonic()
    await writer.submit(insert(3))  # busy: it waits a second for company
    assert time.monotonic() - started >= 1.0
    started = time.monotonic()
    await writer.submit(insert(4))  # the last batch was alone: no waiting now
    assert time.monotonic() - started < 0.9
    writer.stop()
    await asyncio.to_thread(writer.join)
    with contextlib.closing(sqlite3.connect(tmp_path / "w.sqlite")) as check:
        assert check.execute("SELECT count(*) FROM t").fetchone() == (5,)


@pytest.mark.anyio
async def test_a_transition_with_current_reads_back_only_the_computed_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batcher.ledger import codec

    led = SqliteLedger(tmp_path / "l.sqlite")
    await led.open(run_info())
    (row,) = await led.import_rows([new_row(1)])
    decoded: list[str] = []
    real = codec.row_from_record

    def counting(r: Any) -> Any:
        decoded.append(r["row_id"])
        return real(r)

    monkeypatch.setattr(codec, "row_from_record", counting)
    moved = await led.transition(
        "r1", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g"}, event="s", current=row
    )
    assert decoded == []  # nothing decoded: the row was built from current
    (sql,) = led._transition_cache.values()
    assert "RETURNING updated_at, attempts, polls" in sql
    full = await led.transition("r1", Stage.SUBMITTED, Stage.COMPLETE, event="c")
    assert decoded == ["r1"]  # without current the whole row is read back
    assert (moved.stage, full.stage, full.generation_id) == (
        Stage.SUBMITTED,
        Stage.COMPLETE,
        "g",
    )
    await led.close(0)


# -- migrations and opening -----------------------------------------------------


@pytest.mark.anyio
async def test_migrations_are_recorded_once_and_reopen_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "l.sqlite"  # the folder is created
    led = SqliteLedger(path, wall=lambda: 1234.5)
    await led.open(run_info("one"))
    await led.close(0)
    first = tables(path)
    assert first["migrations"][:3] == [
        (1, "initial", 1234.5), (2, "leases", 1234.5), (3, "row_versions", 1234.5)
    ]
    assert first["migrations"] == [(m.version, m.name, 1234.5)
                                   for m in load_migrations("sqlite")]
    assert {t for (t,) in first["tables"]} >= {
        "ledger_rows",
        "ledger_events",
        "ledger_runs",
        "ledger_migrations",
    }
    assert {i for (i,) in first["indexes"]} >= {
        "ledger_rows_line",
        "ledger_rows_stage",
        "ledger_rows_group",
        "ledger_rows_key",
    }
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for run_id in ("two", "three"):
        led = SqliteLedger(path, wall=lambda: 9999.0)
        await led.open(run_info(run_id))
        await led.close(0)
    assert tables(path) == first


@pytest.mark.anyio
async def test_a_ledger_from_a_newer_batcher_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    led = SqliteLedger(path)
    await led.open(run_info())
    await led.close(0)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO ledger_migrations VALUES (99, 'future', 0)")
    for lock in (True, False):
        with pytest.raises(LedgerError, match="newer"):
            await SqliteLedger(path).open(run_info(), lock=lock)
    assert not RunLock(path).held and RunLock(path).holder() is None  # lock released


@pytest.mark.anyio
async def test_an_old_ledger_is_migrated_by_a_reader_when_no_run_holds_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l.sqlite"
    with sqlite3.connect(path) as conn:  # an empty ledger at version 0
        conn.execute(
            "CREATE TABLE ledger_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
    reader = SqliteLedger(path)
    await reader.open(run_info("status"), lock=False)
    assert [r async for r in reader.rows()] == []
    await reader.close()
    assert [v for v, _, _ in tables(path)["migrations"]] == [
        m.version for m in load_migrations("sqlite")]


@pytest.mark.anyio
async def test_a_ledger_written_at_version_2_migrates_forward_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # a ledger as a batcher with 2 migrations left it
        conn.executescript(BOOTSTRAP_SQL + ";")
        for mig in load_migrations("sqlite")[:2]:
            conn.executescript(mig.sql)
            record = "INSERT INTO ledger_migrations VALUES (?, ?, 1.0)"
            conn.execute(record, (mig.version, mig.name))
        conn.execute(
            "INSERT INTO ledger_rows (row_id, line, kind, stage, model_key, api_project_id, "
            "idempotency_key, generation_id, created_at, updated_at, lease_owner, lease_expires) "
            "VALUES ('r1', 1, 'project', 'submitted', 'diffio-3.5', 'p1', 'key-1', 'g1', 1, 2, "
            "'w-old', 99)"
        )
    led = SqliteLedger(path)
    await led.open(run_info("new"))
    try:
        row = await led.get("r1")
        assert row is not None and (row.stage, row.generation_id, row.version) == (
            Stage.SUBMITTED, "g1", 0
        )
        done = await led.transition("r1", Stage.SUBMITTED, Stage.SUBMITTED, {"polls_delta": 1},
                                    event="polled", current=row)
        assert (done.version, done.polls) == (1, 1) and done == await led.get("r1")
    finally:
        await led.close(0)
    assert [v for v, _, _ in tables(path)["migrations"]] == [
        m.version for m in load_migrations("sqlite")]
    with sqlite3.connect(path) as conn:  # the old lease columns are left as they were
        assert conn.execute("SELECT lease_owner FROM ledger_rows").fetchall() == [("w-old",)]


@pytest.mark.anyio
async def test_someone_elses_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "photos.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    for lock in (True, False):
        with pytest.raises(LedgerError, match="not a batcher ledger"):
            await SqliteLedger(path).open(run_info(), lock=lock)
    with sqlite3.connect(path) as conn:
        names = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    assert names == [("photos",)]


@pytest.mark.anyio
async def test_reading_a_missing_ledger_fails_without_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.sqlite"
    with pytest.raises(LedgerError, match="no ledger"):
        await SqliteLedger(path).open(run_info(), lock=False)
    assert not path.exists()


@pytest.mark.anyio
async def test_a_ledger_is_opened_once(tmp_path: Path) -> None:
    led = SqliteLedger(tmp_path / "l.sqlite")
    await led.open(run_info())
    with pytest.raises(LedgerError, match="already opened"):
        await led.open(run_info())
    await led.close(0)


def test_open_ledger_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_ledger(":memory:"), MemoryLedger)
    led = open_ledger(str(tmp_path / "x.sqlite"))
    assert isinstance(led, SqliteLedger) and led.path == tmp_path / "x.sqlite"
    via_url = open_ledger(f"sqlite://{tmp_path / 'y.sqlite'}")
    assert isinstance(via_url, SqliteLedger) and via_url.path == tmp_path / "y.sqlite"
    from batcher.ledger.postgres import PostgresLedger

    for url in ("postgresql://u@h/db", "postgres://h/db"):
        assert isinstance(open_ledger(url), PostgresLedger)
    with pytest.raises(ConfigError) as bad:
        open_ledger("postgresql://u:pw-secret@h:notaport/db")
    assert "pw-secret" not in str(bad.value)
    with pytest.raises(ConfigError):
        open_ledger("")


LAZY_CHILD = r"""
import sys
import batcher.cli
from batcher.ledger import SqliteLedger, open_ledger
open_ledger(sys.argv[1])
assert "asyncpg" not in sys.modules, "asyncpg imported without a postgresql:// URL"
import batcher.ledger
from batcher.ledger import PostgresLedger
assert "asyncpg" in sys.modules and PostgresLedger.__module__ == "batcher.ledger.postgres"
assert batcher.ledger.PostgresLedger is PostgresLedger
assert isinstance(open_ledger("postgresql://u@h/db"), PostgresLedger)
try:
    batcher.ledger.NoSuchThing
except AttributeError:
    print("ok")
"""


@pytest.mark.slow
def test_asyncpg_is_imported_only_for_postgresql(tmp_path: Path) -> None:
    # A fresh interpreter: this one has imported asyncpg for other tests.
    done = subprocess.run(
        [sys.executable, "-c", LAZY_CHILD, str(tmp_path / "l.sqlite")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok"]


@pytest.mark.anyio
async def test_an_unwritable_place_is_a_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LedgerError):
        await SqliteLedger(blocker / "l.sqlite").open(run_info())
    with pytest.raises(LedgerError, match=r"not a batcher ledger|cannot"):
        await SqliteLedger(blocker).open(run_info())


def test_a_migration_number_missing_from_a_ledger_is_applied_when_it_appears() -> None:
    # Numbers are handed out to changes made side by side, so a ledger may
    # have recorded a later one first; what is not recorded is still to do.
    known = [m.version for m in load_migrations("sqlite")]
    assert known[0] == 1 and len(set(known)) == len(known)
    done = [v for v in known if v != 2]
    assert [m.version for m in pending_migrations("sqlite", done)] == [2]
    assert pending_migrations("sqlite", known) == []
    with pytest.raises(LedgerError, match="newer than this batcher knows"):
        pending_migrations("sqlite", [*known, max(known) + 1])

"""What only the PostgreSQL ledger has: several hosts on one ledger.

Hosts are separate :class:`PostgresLedger` instances (each with its own
connection pool) and, where it matters, separate processes started with
``python -c CHILD`` and killed with real signals. Every test works in a fresh
schema of ``$BATCHER_TEST_PG`` (default postgresql://postgres@127.0.0.1:5432/test),
dropped at the end; the tests are skipped, saying why, only when that server
cannot be reached.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from conftest import PgSchemas

from batcher.errors import ConfigError, LedgerError, TransitionConflict
from batcher.ledger import PostgresLedger, open_ledger
from batcher.ledger.base import LEASE_TAKEN_OVER
from batcher.ledger.migrations import BOOTSTRAP_SQL, load_migrations
from batcher.model import Kind, LedgerRow, NewRow, RunInfo, Stage

pytestmark = pytest.mark.postgres

TTL = 0.5  # real seconds: short, so a dead host's leases expire within the test

# The manifest every host imports, as source so that child processes build
# exactly the same rows. Groups of 5 rows share a key (one logical request).
MANIFEST_SRC = """
from batcher.model import Kind, NewRow

def manifest(n):
    return [
        NewRow(f"r{i:04d}", i, Kind.API_PROJECT, f"key-{i % (n // 5)}", "diffio-3.5",
               api_project_id=f"p{i % (n // 5)}", sampling={"seed": i % (n // 5)},
               group=f"g{i % (n // 5)}")
        for i in range(1, n + 1)
    ]
"""
_ns: dict[str, Any] = {}
exec(MANIFEST_SRC, _ns)
manifest: Callable[[int], list[NewRow]] = _ns["manifest"]

CHILD = (
    MANIFEST_SRC
    + r"""
import asyncio, os, socket, sys, time
from batcher.ledger import PostgresLedger
from batcher.model import RunInfo

async def main(url, mode, n):
    n = int(n)
    led = PostgresLedger(url)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says go: every host starts at once
    run = RunInfo(f"child-{os.getpid()}", os.getpid(), socket.gethostname(), time.time(), mode)
    await led.open(run)
    if mode == "import":
        rows = manifest(n)
        for i in range(0, n, 50):
            await led.import_rows(rows[i : i + 50])
        print("retired", await led.finish_import(), flush=True)
    elif mode in ("lease", "hold"):
        worker = f"worker-{os.getpid()}"
        await led.register_worker(worker, run, 0.5)
        got = await led.lease(worker, n, 0.5)
        print("leased", worker, " ".join(r.row_id for r in got), flush=True)
        while True:  # a live host heartbeats until it is killed
            await led.heartbeat(worker, 0.5)
            if mode == "hold" and not await led.hold(worker, got[0].row_id, 0.5):
                print("lost", got[0].row_id, flush=True)  # what it would post is not its own
                break
            await asyncio.sleep(0.1)
    await led.close(0)
    print("done", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def schema_and_url(pg_schemas: PgSchemas) -> tuple[str, str]:
    return pg_schemas.new()


@pytest.fixture
def schema(schema_and_url: tuple[str, str]) -> str:
    return schema_and_url[0]


@pytest.fixture
def url(schema_and_url: tuple[str, str]) -> str:
    return schema_and_url[1]


def plain_row(row_id: str, line: int) -> NewRow:
    return NewRow(row_id, line, Kind.API_PROJECT, f"key-{row_id}", "diffio-3.5", api_project_id="p")


def run_info(run_id: str) -> RunInfo:
    return RunInfo(run_id, os.getpid(), socket.gethostname(), time.time(), "pytest")


@pytest.fixture
async def hosts(url: str) -> AsyncIterator[list[PostgresLedger]]:
    """Three opened ledgers on one schema, as three hosts would have."""
    opened = []
    for i in range(3):
        led = PostgresLedger(url)
        await led.open(run_info(f"host-{i}"))
        opened.append(led)
    yield opened
    for led in opened:
        await led.close(0)


async def raw(url: str, schema: str) -> asyncpg.Connection[Any]:
    base = url.split("?", 1)[0]
    return await asyncpg.connect(base, server_settings={"search_path": schema})


class Child:
    """A ``python -c CHILD`` process that waits for "go" on stdin."""

    def __init__(self, url: str, mode: str, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, mode, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.line() == "ready"

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    async def finish(self) -> list[str]:
        out, err = await asyncio.to_thread(self.proc.communicate, None, 30)
        assert self.proc.returncode == 0, err
        return out.splitlines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=10)


# -- import ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_hosts_importing_one_manifest_at_once_end_with_one_copy(
    url: str, schema: str
) -> None:
    n = 600
    child = Child(url, "import", n)
    try:
        hosts = [PostgresLedger(url) for _ in range(2)]
        for i, led in enumerate(hosts):
            await led.open(run_info(f"host-{i}"))
        rows = manifest(n)

        async def import_all(led: PostgresLedger) -> tuple[list[LedgerRow], int]:
            got: list[LedgerRow] = []
            for i in range(0, n, 50):
                got += await led.import_rows(rows[i : i + 50])
            return got, await led.finish_import()

        child.go()
        results = await asyncio.gather(*(import_all(led) for led in hosts))
        lines = await child.finish()
    finally:
        child.kill()
    assert "retired 0" in lines and lines[-1] == "done"
    assert [retired for _, retired in results] == [0, 0]
    conn = await raw(url, schema)
    try:
        assert await conn.fetchval("SELECT COUNT(*) FROM ledger_rows") == n
        assert await conn.fetchval("SELECT COUNT(*) FROM ledger_rows WHERE retired") == 0
        imported = await conn.fetch(
            "SELECT row_id, COUNT(*) AS n FROM ledger_events WHERE event = 'imported' "
            "GROUP BY row_id HAVING COUNT(*) <> 1"
        )
        assert imported == []  # each row inserted, and its import recorded, once
        runs = await conn.fetchval("SELECT COUNT(*) FROM ledger_runs")
        assert runs == 3
    finally:
        await conn.close()
    # every host sees the same rows; a group's first row by line leads the rest
    groups = n // 5
    for got, _ in results:
        assert [r.row_id for r in got] == [r.row_id for r in rows]
        for r in got:
            first = (r.line - 1) % groups + 1
            assert r.leader_row_id == (None if r.line == first else f"r{first:04d}"), r
    for led in hosts:
        await led.close(0)


@pytest.mark.anyio
async def test_a_host_never_retires_rows_another_host_just_imported(url: str) -> None:
    old = PostgresLedger(url)
    await old.open(run_info("yesterday"))
    await old.import_rows([*manifest(20), plain_row("dropped", 99)])
    await old.close(0)
    a, b = PostgresLedger(url), PostgresLedger(url)
    await a.open(run_info("a"))
    await b.open(run_info("b"))  # opened after a
    # b's import lands after a's: with "last run that saw it" a would retire everything
    await a.import_rows(manifest(20))
    await b.import_rows(manifest(20))
    assert await a.finish_import() == 1  # only the row today's manifest dropped
    assert await b.finish_import() == 0
    c = PostgresLedger(url)
    await c.open(run_info("c"))
    await c.import_rows(manifest(20))  # c opened last, a imports after it: same again
    await a.import_rows(manifest(20))
    assert await c.finish_import() == 0 and await a.finish_import() == 0
    got = [r async for r in a.rows(include_retired=True)]
    assert [r.row_id for r in got if r.retired] == ["dropped"] and len(got) == 21
    for led in (a, b, c):
        await led.close(0)


@pytest.mark.anyio
async def test_imports_in_opposite_orders_still_end_with_one_copy(
    hosts: list[PostgresLedger],
) -> None:
    rows = manifest(400)
    backwards = rows[::-1]

    async def import_all(led: PostgresLedger, ordered: list[NewRow]) -> None:
        for i in range(0, len(ordered), 100):
            await led.import_rows(ordered[i : i + 100])

    await asyncio.gather(
        import_all(hosts[0], rows), import_all(hosts[1], backwards), import_all(hosts[2], rows)
    )
    assert sum((await hosts[0].counts()).values()) == 400
    assert [r.row_id async for r in hosts[2].rows()] == [r.row_id for r in rows]


# -- leases ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_three_hosts_leasing_at_once_get_disjoint_rows_covering_all(
    hosts: list[PostgresLedger],
) -> None:
    n = 300
    rows = [plain_row(f"x{i:03d}", i) for i in range(n)]
    await hosts[0].import_rows(rows)
    for i, led in enumerate(hosts):
        await led.register_worker(f"w{i}", run_info(f"host-{i}"), 30)

    async def drain(led: PostgresLedger, worker: str) -> list[str]:
        got: list[str] = []
        while batch := await led.lease(worker, 7, 30):
            got += [r.row_id for r in batch]
        return got

    shares = await asyncio.gather(*(drain(led, f"w{i}") for i, led in enumerate(hosts)))
    flat = [rid for share in shares for rid in share]
    assert len(flat) == len(set(flat)) == n
    assert all(shares), "a host got nothing: no concurrency was exercised"
    assert await hosts[1].pending_work() == (0, n)
    assert await hosts[2].heartbeat("w2", 30) == 3


@pytest.mark.anyio
async def test_a_killed_hosts_rows_are_taken_over_after_its_lease_expires(
    url: str, hosts: list[PostgresLedger]
) -> None:
    survivor = hosts[0]
    await survivor.import_rows(manifest(10))  # 2 leaders per key group of 5: r0001, r0002
    child = Child(url, "lease", 1)
    try:
        child.go()
        word, dead_worker, leased = child.line().split(" ", 2)
        assert word == "leased" and leased == "r0001"
        await survivor.register_worker("survivor", run_info("host-0"), TTL)
        assert await survivor.heartbeat("survivor", TTL) == 2  # the child heartbeats
        assert [r.row_id for r in await survivor.lease("survivor", 10, TTL)] == ["r0002"]
        await asyncio.sleep(TTL + 0.2)
        await survivor.heartbeat("survivor", TTL)
        # Its own lease ran out while it slept; the child heartbeats and keeps r0001.
        assert [r.row_id for r in await survivor.lease("survivor", 10, TTL)] == ["r0002"]
        child.kill()  # the host dies mid-job: no deregistration, no release
    finally:
        child.kill()
    deadline = time.monotonic() + 5
    while await survivor.heartbeat("survivor", TTL) != 1:
        assert time.monotonic() < deadline, "the killed worker still counts as live"
        await asyncio.sleep(0.1)
    assert [w["worker_id"] for w in await survivor.live_workers()] == ["survivor"]
    taken = await survivor.lease("survivor", 10, TTL)
    assert [r.row_id for r in taken] == ["r0001"]
    last = (await hosts[1].events("r0001"))[-1]
    assert last.event == LEASE_TAKEN_OVER and last.from_stage is last.to_stage is Stage.PENDING
    assert last.detail["previousOwner"] == dead_worker and last.detail["owner"] == "survivor"
    assert await hosts[2].pending_work() == (0, 2)


@pytest.mark.anyio
async def test_a_host_paused_past_its_ttl_finds_its_row_taken_and_its_copy_useless(
    url: str, hosts: list[PostgresLedger]
) -> None:
    survivor = hosts[0]
    await survivor.import_rows(manifest(5)[:1])
    child = Child(url, "hold", 1)  # leases r0001, then heartbeats and holds it
    try:
        child.go()
        word, _, leased = child.line().split(" ", 2)
        assert (word, leased) == ("leased", "r0001")
        await survivor.register_worker("survivor", run_info("host-0"), TTL)
        assert await survivor.lease("survivor", 1, TTL) == []
        child.proc.send_signal(signal.SIGSTOP)  # the hypervisor pauses the host
        await asyncio.sleep(TTL + 0.3)
        (taken,) = await survivor.lease("survivor", 1, TTL)
        await survivor.transition("r0001", Stage.PENDING, Stage.SUBMITTED,
                                  {"generation_id": "g-survivor"}, event="submitted",
                                  current=taken)
        child.proc.send_signal(signal.SIGCONT)  # it wakes up and checks before posting
        assert child.line() == "lost r0001"
        assert (await child.finish())[-1] == "done"
    finally:
        child.kill()
    row = await hosts[1].get("r0001")
    assert row is not None and row.generation_id == "g-survivor"


@pytest.mark.anyio
async def test_host_clocks_do_not_move_lease_expiry(url: str) -> None:
    # Real time on the server; one host's clock a day slow, the other's a year fast.
    slow, fast = PostgresLedger(url, wall=lambda: time.time() - 86_400), PostgresLedger(
        url, wall=lambda: time.time() + 365 * 86_400
    )
    await slow.open(run_info("slow"))
    await fast.open(run_info("fast"))
    try:
        await slow.import_rows(manifest(5)[:1])
        await slow.register_worker("slow", run_info("slow"), TTL * 4)
        await fast.register_worker("fast", run_info("fast"), TTL * 4)
        assert [r.row_id for r in await slow.lease("slow", 1, TTL * 4)] == ["r0001"]
        assert await fast.lease("fast", 1, TTL * 4) == []  # fresh, whatever fast's clock says
        assert await fast.heartbeat("fast", TTL * 4) == 2
        assert await slow.hold("slow", "r0001", TTL)
        await asyncio.sleep(TTL + 0.3)
        assert [r.row_id for r in await fast.lease("fast", 1, TTL * 4)] == ["r0001"]
        assert not await slow.hold("slow", "r0001", TTL)
    finally:
        await slow.close(0)
        await fast.close(0)


# -- transitions -------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_hosts_moving_one_row_one_wins_the_other_conflicts(
    hosts: list[PostgresLedger],
) -> None:
    a, b = hosts[0], hosts[1]
    await a.import_rows(manifest(5))
    for attempt in range(5):
        rid = f"r{attempt + 1:04d}"
        results = await asyncio.gather(
            a.transition(rid, Stage.PENDING, Stage.SUBMITTED, {"generation_id": "ga"}, event="a"),
            b.transition(rid, Stage.PENDING, Stage.SUBMITTED, {"generation_id": "gb"}, event="b"),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, LedgerRow)]
        losses = [r for r in results if isinstance(r, TransitionConflict)]
        assert len(wins) == 1 and len(losses) == 1, results
        assert losses[0].actual == "submitted" and losses[0].expected == "pending"
        events = [e.event for e in await hosts[2].events(rid)]
        assert events == ["imported", "a" if wins[0].generation_id == "ga" else "b"]


@pytest.mark.anyio
async def test_two_hosts_holding_one_copy_cannot_both_replace_a_project(
    hosts: list[PostgresLedger],
) -> None:
    a, b = hosts[0], hosts[1]
    (row,) = await a.import_rows([NewRow("f1", 1, Kind.FILE, "k", "diffio-3.5")])
    row = await a.transition("f1", Stage.PENDING, Stage.PROJECT_CREATED,
                             {"api_project_id": "p-first"}, event="project", current=row)
    # b took the row over while a was paused; both hold the same copy now.
    for _ in range(5):
        results = await asyncio.gather(
            *(
                led.transition("f1", Stage.PROJECT_CREATED, Stage.PROJECT_CREATED,
                               {"api_project_id": f"p-{name}"}, event=f"fresh-{name}",
                               current=row)
                for led, name in ((a, "a"), (b, "b"))
            ),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, LedgerRow)]
        losses = [r for r in results if isinstance(r, TransitionConflict)]
        assert len(wins) == 1 and len(losses) == 1, results
        stored = await hosts[2].get("f1")
        assert stored == wins[0]
        row = stored
    # The loser, writing from the copy it had, conflicts again rather than overwrite.
    with pytest.raises(TransitionConflict, match="version"):
        await a.transition("f1", Stage.PROJECT_CREATED, Stage.UPLOADED, event="uploaded",
                           current=dataclasses.replace(row, version=row.version - 1))


@pytest.mark.anyio
async def test_a_ledger_at_version_2_migrates_forward_and_keeps_its_rows(
    url: str, schema: str
) -> None:
    conn = await raw(url, schema)
    try:  # a ledger as a batcher with two migrations left it
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(BOOTSTRAP_SQL)
        for mig in load_migrations("postgres")[:2]:
            await conn.execute(mig.sql)
            await conn.execute("INSERT INTO ledger_migrations VALUES ($1, $2, 1.0)",
                               mig.version, mig.name)
        await conn.execute(
            "INSERT INTO ledger_rows (row_id, line, kind, stage, model_key, api_project_id, "
            "idempotency_key, generation_id, created_at, updated_at, seen_seq) "
            "VALUES ('r1', 1, 'project', 'submitted', 'diffio-3.5', 'p1', 'key-1', 'g1', 1, 2, 1)"
        )
    finally:
        await conn.close()
    led = PostgresLedger(url)
    await led.open(run_info("new"))
    try:
        row = await led.get("r1")
        assert row is not None and (row.generation_id, row.version) == ("g1", 0)
        done = await led.transition("r1", Stage.SUBMITTED, Stage.COMPLETE, event="complete",
                                    current=row)
        assert done.version == 1 and done == await led.get("r1")
    finally:
        await led.close(0)


@pytest.mark.anyio
async def test_racing_moves_from_a_stage_set_record_the_stage_they_left(
    hosts: list[PostgresLedger],
) -> None:
    a, b = hosts[0], hosts[1]
    await a.import_rows(manifest(5)[:1])
    either = frozenset({Stage.PENDING, Stage.PROJECT_CREATED})

    async def bump(led: PostgresLedger, i: int) -> LedgerRow:
        while True:  # as a runner would: a lost race is read again and retried
            row = await led.get("r0001")
            try:
                return await led.transition(
                    "r0001", either, Stage.PROJECT_CREATED, {"attempts_delta": 1},
                    event=f"m{i}", current=row,
                )
            except TransitionConflict:
                continue

    await asyncio.gather(*(bump(a if i % 2 else b, i) for i in range(30)))
    row = await hosts[2].get("r0001")
    assert row is not None and row.stage is Stage.PROJECT_CREATED and row.attempts == 30
    moves = [e for e in await hosts[2].events("r0001") if e.event != "imported"]
    assert len(moves) == 30
    assert [e.from_stage for e in moves] == [Stage.PENDING] + [Stage.PROJECT_CREATED] * 29


@pytest.mark.anyio
async def test_a_transition_with_current_reads_back_only_the_computed_columns(
    hosts: list[PostgresLedger], monkeypatch: pytest.MonkeyPatch
) -> None:
    from batcher.ledger.codec import row_from_record as real

    a, b = hosts[0], hosts[1]
    (row,) = await a.import_rows(manifest(5)[:1])
    decoded: list[str] = []

    def counting(r: Any) -> Any:
        decoded.append(r["row_id"])
        return real(r)

    monkeypatch.setattr("batcher.ledger.codec.row_from_record", counting)
    moved = await a.transition(
        row.row_id, Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g"}, event="s",
        current=row,
    )
    assert decoded == []  # nothing decoded: the row was built from current
    assert moved == await b.get(row.row_id)
    decoded.clear()  # get decoded one
    # A host whose copy is stale still loses the compare-and-set.
    with pytest.raises(TransitionConflict) as info:
        await b.transition(row.row_id, Stage.PENDING, Stage.PROJECT_CREATED, event="late",
                           current=row)
    assert info.value.actual == "submitted"
    full = await a.transition(row.row_id, Stage.SUBMITTED, Stage.COMPLETE, event="c")
    assert decoded == [row.row_id] and full.generation_id == "g"


# -- URLs, opening, migrations ----------------------------------------------------


@pytest.mark.anyio
async def test_the_password_never_shows(schema: str) -> None:
    secret = "hunter2-Sekr3t"
    for url in (
        f"postgresql://postgres:{secret}@127.0.0.1:1/test?schema={schema}",
        f"postgres://postgres@127.0.0.1:1/test?password={secret}&schema={schema}",
        f"postgresql://postgres:{secret.replace('-', '%2D')}@127.0.0.1:1/test",
    ):
        led = PostgresLedger(url, connect_timeout=2)
        assert secret not in led.description and "***" in led.description
        assert secret not in repr(led) and "%2D" not in led.description
        assert led.description.startswith(url.split("://")[0] + "://postgres")
        with pytest.raises(LedgerError) as info:
            await led.open(run_info("x"))
        shown = "".join(traceback.format_exception(info.value))
        assert secret not in shown and "%2D" not in shown.replace(led.description, "")
        assert "127.0.0.1" in str(info.value)  # still says where it failed
        assert secret not in repr(open_ledger(url))
    with pytest.raises(ConfigError) as bad:
        PostgresLedger(f"postgresql://postgres:{secret}@127.0.0.1:notaport/test")
    assert secret not in "".join(traceback.format_exception(bad.value))
    with pytest.raises(ConfigError, match="schema"):
        PostgresLedger('postgresql://h/db?schema=x"; DROP TABLE y')


@pytest.mark.anyio
async def test_migrations_from_processes_starting_at_once_apply_once(url: str, schema: str) -> None:
    children = [Child(url, "open", 0) for _ in range(3)]
    try:
        for child in children:
            child.go()
        outputs = await asyncio.gather(*(child.finish() for child in children))
    finally:
        for child in children:
            child.kill()
    assert all(out[-1] == "done" for out in outputs)
    conn = await raw(url, schema)
    try:
        versions = await conn.fetch("SELECT version, name FROM ledger_migrations ORDER BY 1")
        assert [tuple(v) for v in versions][:3] == [
            (1, "initial"), (2, "leases"), (3, "versions_and_pacing")
        ]
        assert [tuple(v) for v in versions] == [(m.version, m.name)
                                                for m in load_migrations("postgres")]
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
            schema,
        )
        assert [t[0] for t in tables] == [
            "ledger_events",
            "ledger_migrations",
            "ledger_pace",
            "ledger_rows",
            "ledger_runs",
            "ledger_upload_parts",
            "ledger_webhook_counts",
            "ledger_webhook_events",
            "ledger_workers",
        ]
        assert await conn.fetchval("SELECT COUNT(*) FROM ledger_runs") == 3
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_opening_refuses_what_is_not_our_ledger(url: str, schema: str) -> None:
    with pytest.raises(LedgerError, match="no batcher ledger"):
        await PostgresLedger(url).open(run_info("status"), lock=False)
    led = PostgresLedger(url)
    await led.open(run_info("one"))
    await led.close(0)
    conn = await raw(url, schema)
    try:
        await conn.execute("INSERT INTO ledger_migrations VALUES (99, 'future', 0)")
        for lock in (True, False):
            with pytest.raises(LedgerError, match="newer"):
                await PostgresLedger(url).open(run_info("two"), lock=lock)
        await conn.execute("DROP TABLE ledger_migrations")
        with pytest.raises(LedgerError, match="not a batcher ledger"):
            await PostgresLedger(url).open(run_info("three"))
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_a_reader_sees_a_running_hosts_writes_and_cannot_write(url: str) -> None:
    writer = PostgresLedger(url)
    await writer.open(run_info("run"))
    await writer.import_rows(manifest(10))
    reader = PostgresLedger(url)
    await reader.open(run_info("status"), lock=False)
    await writer.transition("r0001", Stage.PENDING, Stage.PROJECT_CREATED, event="project")
    assert (await reader.counts())[Stage.PROJECT_CREATED] == 1
    with pytest.raises(LedgerError, match="read-only"):
        await reader.transition("r0002", Stage.PENDING, Stage.PROJECT_CREATED, event="project")
    assert [r["run_id"] for r in await reader.runs()] == ["run"]
    await reader.close()
    await writer.close(0)

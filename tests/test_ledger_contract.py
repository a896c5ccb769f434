"""One contract for every ledger backend (memory, SQLite, PostgreSQL).

A new backend joins by adding a name to ``BACKENDS`` and a branch to
``Backend.make``; every test here must then pass unchanged. The lease tests
run on the shared backends only (``SHARED_BACKENDS``): a private ledger has no
leases.

PostgreSQL runs against ``$BATCHER_TEST_PG`` (default
postgresql://postgres@127.0.0.1:5432/test), each test in a fresh schema that
is dropped at the end of the session (conftest's ``pg_schemas``); its tests
are skipped, saying why, only when that server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import PgSchemas

from batcher.errors import LedgerError, TransitionConflict
from batcher.ledger import MemoryLedger, PostgresLedger, SqliteLedger
from batcher.ledger.base import LEASE_TAKEN_OVER, LeasingLedger, Ledger, NextMove, is_shared
from batcher.model import (
    LEGAL_MOVES,
    UPDATE_COLUMNS,
    Kind,
    LedgerRow,
    NewRow,
    RunInfo,
    Stage,
    Update,
    UploadPart,
    UploadSession,
)

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
SHARED_BACKENDS = ["memory", pytest.param("postgres", marks=pytest.mark.postgres)]
PAGE = 7  # small pages, so paging is exercised with a few dozen rows


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeWall:
    """Strictly increasing time, safe to call from the writer thread."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._now += 0.5
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class Backend:
    """Makes (and re-makes, for a new run) a ledger of one kind on one store.

    ``shared`` makes the memory ledger a shared one; each run then gets its
    own handle on it, as each PostgreSQL run gets its own connections.
    Leases are judged by the store's clock: :meth:`advance` moves it (the
    fake wall of the memory store; the database's clock function of the
    PostgreSQL schema).
    """

    def __init__(self, name: str, tmp_path: Path, pg_url: str = "", shared: bool = False) -> None:
        self.name = name
        self.wall = FakeWall()
        self.path = tmp_path / "ledger.sqlite"
        self.pg_url = pg_url
        self._memory = MemoryLedger(wall=self.wall, page_size=PAGE, shared=shared)
        self._runs = itertools.count(1)
        self._db_offset = 0.0

    def make(self, wall: Callable[[], float] | None = None) -> Ledger:
        wall = wall or self.wall
        if self.name == "memory":
            return self._memory.connect(wall=wall) if self._memory.shared else self._memory
        if self.name == "sqlite":
            return SqliteLedger(self.path, wall=wall, page_size=PAGE)
        if self.name == "postgres":
            return PostgresLedger(self.pg_url, wall=wall, page_size=PAGE)
        raise AssertionError(self.name)

    async def open(
        self,
        *,
        lock: bool = True,
        run_id: str | None = None,
        wall: Callable[[], float] | None = None,
    ) -> Ledger:
        led = self.make(wall)
        rid = run_id or f"run-{next(self._runs)}"
        await led.open(RunInfo(rid, 4242, "host-a", 1_000.0, "batcher run m.csv"), lock=lock)
        return led

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Ledger]:
        """A ledger opened for a run, closed (exit code 0) at the end."""
        led = await self.open()
        try:
            yield led
        finally:
            await led.close(0)

    async def open_shared(self, **how: Any) -> LeasingLedger:
        """:meth:`open`, for a ledger that must be shared."""
        led = await self.open(**how)
        assert is_shared(led)
        return led

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the store's clock (and on the hosts' walls)."""
        self.wall.advance(seconds)
        if self.name != "postgres":
            return
        self._db_offset += seconds
        base, _, query = self.pg_url.partition("?")
        schema = query.rsplit("schema=", 1)[1]
        conn = await asyncpg.connect(base, timeout=5)
        try:  # the ledger reads the database's time through this function only
            await conn.execute(
                f'CREATE OR REPLACE FUNCTION "{schema}".ledger_now() RETURNS double precision '
                f"LANGUAGE sql VOLATILE AS $$ SELECT extract(epoch FROM clock_timestamp())"
                f"::double precision + {self._db_offset!r} $$"
            )
        finally:
            await conn.close()


def _backend(request: pytest.FixtureRequest, tmp_path: Path, *, shared: bool) -> Backend:
    if request.param == "postgres":
        schemas: PgSchemas = request.getfixturevalue("pg_schemas")
        return Backend(request.param, tmp_path, schemas.new()[1], shared=shared)
    return Backend(request.param, tmp_path, shared=shared)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _backend(request, tmp_path, shared=False)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _backend(request, tmp_path, shared=True)


@pytest.fixture
async def ledger(backend: Backend) -> AsyncIterator[Ledger]:
    async with backend.running() as led:
        yield led


@pytest.fixture
async def shared(shared_backend: Backend) -> AsyncIterator[LeasingLedger]:
    async with shared_backend.running() as led:
        assert is_shared(led)
        yield led


def new_row(i: int, **kw: Any) -> NewRow:
    fields: dict[str, Any] = {
        "row_id": f"r{i}",
        "line": i,
        "kind": Kind.API_PROJECT,
        "idempotency_key": f"key-{i}",
        "model_key": "diffio-3.5",
        "api_project_id": f"proj-{i}",
        "sampling": {"seed": i},
        "params": {"prompt": f"p{i}"},
        "request_digest": f"digest-{i}",
        "group": f"g{i}",
    }
    fields.update(kw)
    return NewRow(**fields)


INVALID = {"code": "invalidRow", "message": "both apiProjectId and file", "httpStatus": None}


def path_to(stage: Stage) -> list[Stage]:
    """Shortest legal path of stages from PENDING to ``stage`` (excluding PENDING)."""
    prev: dict[Stage, Stage | None] = {Stage.PENDING: None}
    todo = deque([Stage.PENDING])
    while todo:
        cur = todo.popleft()
        for nxt in sorted(LEGAL_MOVES[cur]):
            if nxt not in prev:
                prev[nxt] = cur
                todo.append(nxt)
    path: list[Stage] = []
    at: Stage | None = stage
    while at is not None and at is not Stage.PENDING:
        path.append(at)
        at = prev[at]
    return path[::-1]


async def drive(led: Ledger, row_id: str, stage: Stage) -> LedgerRow:
    row = await led.get(row_id)
    assert row is not None and row.stage is Stage.PENDING
    for nxt in path_to(stage):
        row = await led.transition(row_id, row.stage, nxt, event=f"to-{nxt}")
    return row


# -- import -----------------------------------------------------------------


@pytest.mark.anyio
async def test_import_inserts_pending_rows_with_their_content(ledger: Ledger) -> None:
    rows = await ledger.import_rows(
        [
            new_row(1),
            new_row(
                2,
                kind=Kind.FILE,
                api_project_id=None,
                source_path="/a.wav",
                source_sha256="ab",
                source_size=10,
                output_rel="a.out.wav",
                explicit_key=True,
            ),
        ]
    )
    assert [r.row_id for r in rows] == ["r1", "r2"]
    r1, r2 = rows
    assert r1.stage is Stage.PENDING and r1.kind is Kind.API_PROJECT
    assert (r1.idempotency_key, r1.model_key, r1.api_project_id) == (
        "key-1",
        "diffio-3.5",
        "proj-1",
    )
    assert r1.sampling == {"seed": 1} and r1.params == {"prompt": "p1"}
    assert r1.request_digest == "digest-1" and r1.group == "g1" and r1.leader_row_id is None
    assert r1.attempts == 0 and r1.error is None and not r1.retired
    assert r1.created_at == r1.updated_at > 1_000_000.0
    assert (r2.source_path, r2.source_sha256, r2.source_size) == ("/a.wav", "ab", 10)
    assert r2.output_rel == "a.out.wav" and r2.explicit_key is True and r2.kind is Kind.FILE
    assert await ledger.get("r2") == r2
    assert await ledger.get("nope") is None


@pytest.mark.anyio
async def test_import_is_idempotent(ledger: Ledger) -> None:
    first = await ledger.import_rows([new_row(i) for i in range(1, 6)])
    moved = await ledger.transition(
        "r3", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "gen-3"}, event="submitted"
    )
    again = await ledger.import_rows([new_row(i) for i in range(1, 6)])
    assert [r.row_id for r in again] == [r.row_id for r in first]
    assert again[2] == moved  # a known row comes back as stored, not reset
    assert again[0] == first[0]
    counts = await ledger.counts()
    assert counts[Stage.PENDING] == 4 and counts[Stage.SUBMITTED] == 1
    assert [e.event for e in await ledger.events("r1")] == ["imported"]


@pytest.mark.anyio
async def test_known_row_with_changed_content_is_returned_as_stored(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1)])
    got = await ledger.import_rows([new_row(1, idempotency_key="other", source_sha256="ff")])
    assert got[0].idempotency_key == "key-1" and got[0].source_sha256 is None


@pytest.mark.anyio
async def test_known_row_follows_its_new_line(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1), new_row(2)])
    got = await ledger.import_rows([new_row(2, line=1), new_row(1, line=2)])
    assert [(r.row_id, r.line) for r in got] == [("r2", 1), ("r1", 2)]
    assert [r.row_id async for r in ledger.rows()] == ["r2", "r1"]


@pytest.mark.anyio
async def test_first_row_of_a_group_leads_the_later_ones(ledger: Ledger) -> None:
    got = await ledger.import_rows(
        [
            new_row(1, group="g"),
            new_row(2, group="h"),
            new_row(3, group="g"),
        ]
    )
    assert [r.leader_row_id for r in got] == [None, None, "r1"]
    # across import batches too, and rows without a group never lead or follow
    more = await ledger.import_rows(
        [new_row(4, group="g"), new_row(5, group=None), new_row(6, group="h")]
    )
    assert [r.leader_row_id for r in more] == ["r1", None, "r2"]


@pytest.mark.anyio
async def test_a_retired_row_does_not_lead(backend: Backend) -> None:
    led = await backend.open()
    await led.import_rows([new_row(1, group="g"), new_row(2, group="g")])
    assert await led.finish_import() == 0
    await led.close(0)
    # next run: r1 is gone from the manifest; a new r3 of the group comes
    # after r2 and follows r2, the group's first row in this manifest
    led = await backend.open()
    got = await led.import_rows([new_row(2, group="g"), new_row(3, group="g")])
    assert got[0].leader_row_id == "r1"  # known rows are returned as stored
    assert got[1].leader_row_id == "r2"
    assert await led.finish_import() == 1
    await led.close(0)


@pytest.mark.anyio
async def test_a_row_holding_its_request_leads_whatever_its_line(backend: Backend) -> None:
    # Last run: r5 sent the group's request (and r6, of another group, only
    # waits). Tonight a new r1 of r5's group comes first, and a new r2 of r6's.
    led = await backend.open()
    await led.import_rows([new_row(5, group="g"), new_row(6, group="h")])
    await led.transition("r5", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g5"},
                         event="submitted")
    await led.close(0)
    led = await backend.open()
    got = await led.import_rows([new_row(1, group="g"), new_row(2, group="h"),
                                 new_row(5, group="g"), new_row(6, group="h")])
    # r1 follows the holder wherever it stands; r2 leads, as r6 holds nothing
    # and is not above it in this manifest.
    assert [r.leader_row_id for r in got[:2]] == ["r5", None]
    assert [r.row_id for r in await led.group_rows("g")] == ["r1", "r5"]
    # Moving a row to another group moves it in group_rows too.
    (r1,) = [r for r in got if r.row_id == "r1"]
    await led.transition("r1", Stage.PENDING, Stage.PENDING, {"group": "k", "leader_row_id": None},
                         event="requestChanged", current=r1)
    assert [r.row_id for r in await led.group_rows("g")] == ["r5"]
    assert [r.row_id for r in await led.group_rows("k")] == ["r1"]
    await led.close(0)


@pytest.mark.anyio
async def test_invalid_rows_are_imported_failed_with_their_error(ledger: Ledger) -> None:
    got = await ledger.import_rows(
        [
            new_row(1),
            new_row(2, error=INVALID, idempotency_key=None, group=None),
            new_row(3, error={"code": "invalidRow", "message": "bad JSON in sampling"}, group=None),
        ]
    )
    assert [r.stage for r in got] == [Stage.PENDING, Stage.FAILED, Stage.FAILED]
    assert got[1].error == INVALID and got[1].status == "failed"
    assert (await ledger.counts())[Stage.FAILED] == 2
    summary = await ledger.error_summary()
    # One line per code, with one of its messages as the example.
    assert summary == [("invalidRow", "bad JSON in sampling", 2)]
    events = await ledger.events("r2")
    assert [(e.from_stage, e.to_stage, e.event) for e in events] == [
        (None, Stage.FAILED, "imported")
    ]
    assert events[0].detail["error"] == INVALID


@pytest.mark.anyio
async def test_invalid_row_error_is_refreshed_and_a_fixed_row_restarts(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1, error=INVALID, group=None)])
    newer = {"code": "invalidRow", "message": "file missing", "httpStatus": None}
    (row,) = await ledger.import_rows([new_row(1, error=newer, group=None)])
    assert row.stage is Stage.FAILED and row.error == newer
    (same,) = await ledger.import_rows([new_row(1, error=newer, group=None)])
    assert same == row  # the same error again changes nothing
    # the row comes valid: it never reached the API, so it restarts with its content
    (fixed,) = await ledger.import_rows([new_row(1, idempotency_key="k-new", group="g")])
    assert fixed.stage is Stage.PENDING and fixed.error is None
    assert fixed.idempotency_key == "k-new" and fixed.group == "g"
    events = [(e.from_stage, e.to_stage, e.event) for e in await ledger.events("r1")]
    assert events == [
        (None, Stage.FAILED, "imported"),
        (Stage.FAILED, Stage.FAILED, "invalid"),
        (Stage.FAILED, Stage.PENDING, "revalidated"),
    ]


@pytest.mark.anyio
async def test_row_turning_invalid_fails_only_if_it_never_reached_the_api(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1), new_row(2)])
    await ledger.transition(
        "r2", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g2"}, event="submitted"
    )
    got = await ledger.import_rows([new_row(1, error=INVALID), new_row(2, error=INVALID)])
    assert got[0].stage is Stage.FAILED and got[0].error == INVALID
    assert got[1].stage is Stage.SUBMITTED and got[1].error is None


@pytest.mark.anyio
async def test_a_runtime_failure_is_not_revived_by_import(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1)])
    err = {"code": "badRequest", "message": "no", "httpStatus": 400}
    await ledger.transition("r1", Stage.PENDING, Stage.FAILED, {"error": err}, event="failed")
    (row,) = await ledger.import_rows([new_row(1)])
    assert row.stage is Stage.FAILED and row.error == err


# -- transitions --------------------------------------------------------------


LEGAL_PAIRS = sorted((src, dst) for src, dsts in LEGAL_MOVES.items() for dst in dsts)
ILLEGAL_PAIRS = sorted((src, dst) for src in Stage for dst in Stage if dst not in LEGAL_MOVES[src])


@pytest.mark.anyio
async def test_every_legal_move_is_allowed(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(i) for i in range(len(LEGAL_PAIRS))])
    for i, (src, dst) in enumerate(LEGAL_PAIRS):
        held = await drive(ledger, f"r{i}", src)
        row = await ledger.transition(
            f"r{i}", src, dst, event="move", detail={"n": i}, current=held
        )
        assert row.stage is dst, (src, dst)
        assert (await ledger.get(f"r{i}")) == row
        last = (await ledger.events(f"r{i}"))[-1]
        assert (last.from_stage, last.to_stage, last.event, last.detail) == (
            src,
            dst,
            "move",
            {"n": i},
        )


@pytest.mark.anyio
async def test_illegal_moves_are_refused_and_change_nothing(ledger: Ledger) -> None:
    assert ILLEGAL_PAIRS, "the table allows everything?"
    await ledger.import_rows([new_row(i) for i in range(len(ILLEGAL_PAIRS))])
    for i, (src, dst) in enumerate(ILLEGAL_PAIRS):
        before = await drive(ledger, f"r{i}", src)
        n_events = len(await ledger.events(f"r{i}"))
        with pytest.raises(LedgerError) as info:
            await ledger.transition(f"r{i}", src, dst, event="illegal")
        assert not isinstance(info.value, TransitionConflict), (src, dst)
        assert "illegal" in str(info.value)
        assert await ledger.get(f"r{i}") == before
        assert len(await ledger.events(f"r{i}")) == n_events


@pytest.mark.anyio
async def test_expect_set_is_checked_against_the_actual_stage(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1), new_row(2)])
    await drive(ledger, "r2", Stage.SUBMITTED)
    # GENERATED is legal from SUBMITTED but not from PENDING
    either = frozenset({Stage.PENDING, Stage.SUBMITTED})
    with pytest.raises(LedgerError, match="illegal") as info:
        await ledger.transition("r1", either, Stage.GENERATED, event="x")
    assert not isinstance(info.value, TransitionConflict)
    row = await ledger.transition("r2", either, Stage.GENERATED, event="x")
    assert row.stage is Stage.GENERATED
    assert (await ledger.events("r2"))[-1].from_stage is Stage.SUBMITTED


@pytest.mark.anyio
async def test_stale_expect_is_a_conflict_naming_the_actual_stage(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1)])
    await ledger.transition(
        "r1", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g"}, event="submitted"
    )
    before = await ledger.get("r1")
    with pytest.raises(TransitionConflict) as info:
        await ledger.transition("r1", Stage.PENDING, Stage.SUBMITTED, event="again")
    assert info.value.actual == "submitted" and info.value.expected == "pending"
    assert info.value.row_id == "r1"
    with pytest.raises(TransitionConflict) as info:
        await ledger.transition(
            "r1", frozenset({Stage.PENDING, Stage.FAILED}), Stage.SUBMITTED, event="again"
        )
    assert info.value.actual == "submitted" and info.value.expected == "failed|pending"
    assert await ledger.get("r1") == before
    assert len(await ledger.events("r1")) == 2


@pytest.mark.anyio
async def test_missing_row_is_a_conflict(ledger: Ledger) -> None:
    with pytest.raises(TransitionConflict) as info:
        await ledger.transition("ghost", Stage.PENDING, Stage.PROJECT_CREATED, event="x")
    assert info.value.actual is None


# Every column a transition can set, with a value unlike the row's own.
FULL_UPDATE: Update = {
    "idempotency_key": "k2",
    "base_key": "k1",
    "retry_count": 2,
    "api_project_id": "p9",
    "generation_id": "g9",
    "api_status": "processing",
    "source_sha256": "aa",
    "source_size": 5,
    "output_path": "/out/x.wav",
    "output_sha256": "bb",
    "output_size": 7,
    "upload_url": "https://u",
    "upload_method": "PUT",
    "upload_expires_at": "2030-01-01T00:00:00Z",
    "content_type": "audio/wav",
    "leader_row_id": "r0",
    "upload_session": UploadSession("upls-1", "https://edge.example/x", "tok-1", 1024,
                                    max_bytes=4096, expires_at="2030-01-01T00:00:00Z"),
    "upload_id": "upl-1",
    "queue_position": 4,
    "error": {"code": "serverError", "message": "boom", "httpStatus": 503},
    "kind": Kind.FILE,
    "model_key": "diffio-4.6-flash",
    "sampling": {"seed": 2},
    "params": {"prompt": "less hiss"},
    "source_path": "/src/new.wav",
    "output_rel": "mix/new.mp3",
    "explicit_key": True,
    "request_digest": "d2",
    "group": "k2|sha256:aa",
    "attempts_delta": 3,
    "polls_delta": 2,
}


@pytest.mark.anyio
async def test_update_sets_columns_and_deltas_add(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1, kind=Kind.FILE)])
    full = Update(**FULL_UPDATE)  # a copy: the test may change it
    row = await ledger.transition("r1", Stage.PENDING, Stage.PENDING, full, event="retry",
                                  current=await ledger.get("r1"))
    stored = await ledger.get("r1")
    assert stored == row
    for key, value in full.items():
        if not key.endswith("_delta"):
            assert getattr(row, key) == value, key
    assert (row.attempts, row.polls) == (3, 2)
    assert row.updated_at > row.created_at
    # absent keys stay, None clears, deltas add again
    row2 = await ledger.transition(
        "r1", Stage.PENDING, Stage.PROJECT_CREATED, {"error": None, "attempts_delta": 1},
        event="project",
    )
    assert row2.error is None and row2.generation_id == "g9" and row2.attempts == 4
    assert row2.polls == 2
    assert (await ledger.error_summary()) == []


@pytest.mark.anyio
async def test_unknown_update_field_is_refused(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1)])
    bad: Any = {"stage": "complete"}
    with pytest.raises(LedgerError, match="unknown update"):
        await ledger.transition("r1", Stage.PENDING, Stage.PENDING, bad, event="x")
    assert (await ledger.get("r1")).stage is Stage.PENDING  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_many_concurrent_writers_lose_no_update(ledger: Ledger) -> None:
    tasks, per = 100, 10
    await ledger.import_rows([new_row(i) for i in range(tasks)])

    async def bump(i: int) -> None:
        row = await ledger.get(f"r{i}")
        for _ in range(per):
            row = await ledger.transition(
                f"r{i}",
                Stage.PENDING,
                Stage.PENDING,
                {"attempts_delta": 1, "polls_delta": 2},
                event="tick",
                current=row,
            )

    await asyncio.gather(*(bump(i) for i in range(tasks)))
    rows = [r async for r in ledger.rows()]
    assert len(rows) == tasks
    assert all(r.attempts == per and r.polls == 2 * per for r in rows)
    assert len(await ledger.events("r7")) == per + 1


@pytest.mark.anyio
async def test_racing_compare_and_sets_have_one_winner(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1)])
    results = await asyncio.gather(
        *(
            ledger.transition(
                "r1", Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": f"p{i}"},
                event=f"try{i}",
            )
            for i in range(30)
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, LedgerRow)]
    assert len(wins) == 1
    assert all(isinstance(r, TransitionConflict) for r in results if r not in wins)
    assert (await ledger.get("r1")) == wins[0]
    winner = str(wins[0].api_project_id).removeprefix("p")
    assert [e.event for e in await ledger.events("r1")] == ["imported", f"try{winner}"]


# -- transition with the caller's row (current=) ------------------------------


@pytest.mark.anyio
async def test_transition_with_current_returns_what_get_reads(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows(
        [new_row(1, kind=Kind.FILE, source_path="/a.wav", sampling={"seed": 1, "k": [1, 2]})]
    )
    # A tuple inside error: the stored value is its JSON copy (a list), and
    # that is what the returned row must hold too.
    error = {"code": "serverError", "message": "boom", "httpStatus": 503, "at": ("a", 1)}
    steps: list[tuple[Stage | frozenset[Stage], Stage, Update]] = [
        (Stage.PENDING, Stage.PENDING, {"error": error, "attempts_delta": 2, "polls_delta": 1}),
        (Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": "p1", "error": None}),
        (
            frozenset({Stage.PENDING, Stage.PROJECT_CREATED}),
            Stage.UPLOADED,
            {"upload_url": "https://u", "source_sha256": "aa", "source_size": 5},
        ),
        (Stage.UPLOADED, Stage.SUBMITTED, {"generation_id": "g1", "attempts_delta": 1}),
        (Stage.SUBMITTED, Stage.SUBMITTED, {"api_status": "processing", "polls_delta": 3}),
        (Stage.SUBMITTED, Stage.GENERATED, {}),
        (
            Stage.GENERATED,
            Stage.COMPLETE,
            {"output_path": "/o/a.wav", "output_sha256": "bb", "output_size": 7},
        ),
    ]
    for expect, to, update in steps:
        before = row
        row = await ledger.transition(row.row_id, expect, to, update, event="x", current=row)
        assert row == await ledger.get("r1"), (expect, to)
        assert row.stage is to and row.updated_at > before.updated_at
    assert row.error is None and row.output_size == 7 and row.source_sha256 == "aa"
    assert (row.attempts, row.polls) == (3, 4)
    events = await ledger.events("r1")
    assert [e.to_stage for e in events[1:]] == [to for _, to, _ in steps]
    assert events[3].from_stage is Stage.PROJECT_CREATED  # the set's stage the row really left


@pytest.mark.anyio
async def test_a_move_with_then_makes_both_moves_and_both_events(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows([new_row(1)])
    moved = await ledger.transition(
        "r1", Stage.PENDING, Stage.SUBMITTED,
        {"generation_id": "g1", "api_status": "complete", "attempts_delta": 1},
        event="submitted", detail={"generationId": "g1"}, current=row,
        then=NextMove(Stage.COMPLETE, {"api_status": "complete"}, "complete"))
    assert moved == await ledger.get("r1")
    assert moved.stage is Stage.COMPLETE and moved.generation_id == "g1"
    assert moved.attempts == 1 and moved.version == row.version + 2
    events = await ledger.events("r1")
    assert [(e.from_stage, e.to_stage, e.event) for e in events[1:]] == [
        (Stage.PENDING, Stage.SUBMITTED, "submitted"),
        (Stage.SUBMITTED, Stage.COMPLETE, "complete"),
    ]
    # A stale copy conflicts before anything is written.
    with pytest.raises(TransitionConflict):
        await ledger.transition("r1", Stage.PENDING, Stage.SUBMITTED, {}, event="again",
                                current=row, then=NextMove(Stage.COMPLETE, {}, "complete"))
    assert len(await ledger.events("r1")) == 3
    with pytest.raises(LedgerError, match="then= needs current="):
        await ledger.transition("r1", Stage.COMPLETE, Stage.FAILED, {}, event="x",
                                then=NextMove(Stage.PENDING, {}, "y"))


@pytest.mark.anyio
async def test_transition_with_current_sets_every_update_column(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows([new_row(1, kind=Kind.FILE)])
    full = Update(**FULL_UPDATE)  # a copy: the test may change it
    assert set(full) == UPDATE_COLUMNS | {"attempts_delta", "polls_delta"}
    moved = await ledger.transition(
        "r1", Stage.PENDING, Stage.PROJECT_CREATED, full, event="p", current=row
    )
    assert moved == await ledger.get("r1")
    for key, value in full.items():
        if not key.endswith("_delta"):
            assert getattr(moved, key) == value, key
    assert (moved.attempts, moved.polls, moved.stage) == (3, 2, Stage.PROJECT_CREATED)
    # the fields no update names are the caller's copy's
    assert (moved.line, moved.created_at) == (row.line, row.created_at)


@pytest.mark.anyio
async def test_transition_with_current_keeps_the_error_as_stored(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows([new_row(1)])
    error = {"code": "serverError", "message": "boom", "retry": ("a", 1)}
    moved = await ledger.transition(
        "r1", Stage.PENDING, Stage.FAILED, {"error": error}, event="failed", current=row
    )
    assert moved.error == {"code": "serverError", "message": "boom", "retry": ["a", 1]}
    assert moved == await ledger.get("r1")
    assert await ledger.error_summary() == [("serverError", "boom", 1)]


@pytest.mark.anyio
async def test_transition_with_current_counts_come_from_the_ledger(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows([new_row(1)])
    first = await ledger.transition(
        "r1", Stage.PENDING, Stage.PENDING, {"attempts_delta": 1}, event="a", current=row
    )
    second = await ledger.transition(
        "r1", Stage.PENDING, Stage.PENDING, {"attempts_delta": 1, "polls_delta": 5},
        event="b", current=first,
    )
    assert (first.attempts, second.attempts, second.polls) == (1, 2, 5)
    assert second == await ledger.get("r1")


# -- versions: every compare-and-set compares what it replaces ------------------


@pytest.mark.anyio
async def test_every_write_of_a_row_raises_its_version(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows([new_row(1)])
    assert row.version == 0
    row = await ledger.transition("r1", Stage.PENDING, Stage.PENDING, {"attempts_delta": 1},
                                  event="a", current=row)
    assert row.version == 1 == (await ledger.get("r1")).version  # type: ignore[union-attr]
    row = await ledger.transition("r1", Stage.PENDING, Stage.PROJECT_CREATED, event="p")
    assert row.version == 2
    # an import that only sees the row leaves it; one that fails it is a write
    (seen,) = await ledger.import_rows([new_row(1, line=7)])
    assert seen.version == 2 and seen.line == 7
    (other,) = await ledger.import_rows([new_row(2)])
    (failed,) = await ledger.import_rows([new_row(2, error=INVALID)])
    assert (failed.stage, failed.version) == (Stage.FAILED, other.version + 1)
    (fixed,) = await ledger.import_rows([new_row(2)])
    assert (fixed.stage, fixed.version) == (Stage.PENDING, other.version + 2)
    assert [r.version async for r in ledger.rows()] == [2, 2]


@pytest.mark.anyio
async def test_two_writers_of_one_same_stage_move_from_one_copy_have_one_winner(
    ledger: Ledger,
) -> None:
    (row,) = await ledger.import_rows([new_row(1, kind=Kind.FILE)])
    row = await ledger.transition(
        "r1", Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": "p-old"}, event="p",
        current=row,
    )
    # Two hosts found the upload URL expired and each made a fresh project.
    results = await asyncio.gather(
        *(
            ledger.transition(
                "r1", Stage.PROJECT_CREATED, Stage.PROJECT_CREATED,
                {"api_project_id": f"p-{host}"}, event=f"fresh-{host}", current=row,
            )
            for host in ("a", "b")
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, LedgerRow)]
    losses = [r for r in results if isinstance(r, TransitionConflict)]
    assert len(wins) == 1 and len(losses) == 1, results
    stored = await ledger.get("r1")
    assert stored == wins[0] and stored is not None
    assert stored.api_project_id in ("p-a", "p-b") and stored.version == row.version + 1
    assert losses[0].actual == f"project (version {stored.version})"
    assert losses[0].expected == f"project (version {row.version})"
    assert [e.event for e in await ledger.events("r1")][-1] == f"fresh-{stored.api_project_id[2:]}"


@pytest.mark.anyio
async def test_a_same_stage_update_from_a_stale_copy_conflicts(ledger: Ledger) -> None:
    (stale,) = await ledger.import_rows([new_row(1)])
    await ledger.transition(
        "r1", Stage.PENDING, Stage.PENDING, {"api_project_id": "p-new"}, event="set",
        current=stale,
    )
    before = await ledger.get("r1")
    for to, update in (
        (Stage.PENDING, Update(api_project_id="p-stale")),
        (Stage.PENDING, Update(attempts_delta=1)),
        (Stage.PROJECT_CREATED, Update()),  # a stage change from a stale copy, too
    ):
        with pytest.raises(TransitionConflict):
            await ledger.transition("r1", Stage.PENDING, to, update, event="late", current=stale)
    assert await ledger.get("r1") == before
    assert [e.event for e in await ledger.events("r1")] == ["imported", "set"]


@pytest.mark.anyio
async def test_a_same_stage_move_without_the_callers_row_is_refused(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows([new_row(1)])
    either = frozenset({Stage.PENDING, Stage.PROJECT_CREATED})
    for expect in (Stage.PENDING, either):
        with pytest.raises(LedgerError, match="current") as info:
            await ledger.transition("r1", expect, Stage.PENDING, {"api_project_id": "x"},
                                    event="blind")
        assert not isinstance(info.value, TransitionConflict)
    with pytest.raises(LedgerError, match="current"):
        await ledger.transition("r1", either, Stage.PROJECT_CREATED, event="blind")
    assert await ledger.get("r1") == row
    # a move to another stage compares the stage, which it changes
    moved = await ledger.transition("r1", Stage.PENDING, Stage.PROJECT_CREATED, event="p")
    assert moved.version == row.version + 1


@pytest.mark.anyio
async def test_a_stale_current_still_conflicts_and_changes_nothing(ledger: Ledger) -> None:
    (stale,) = await ledger.import_rows([new_row(1)])
    await ledger.transition(
        "r1", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g"}, event="submitted"
    )
    before = await ledger.get("r1")
    with pytest.raises(TransitionConflict) as info:
        await ledger.transition(
            "r1", stale.stage, Stage.PROJECT_CREATED, {"api_project_id": "p"}, event="late",
            current=stale,
        )
    assert info.value.actual == "submitted" and info.value.expected == "pending"
    with pytest.raises(TransitionConflict):
        await ledger.transition(
            "r1", frozenset({Stage.PENDING, Stage.FAILED}), Stage.SUBMITTED, event="late",
            current=stale,
        )
    assert await ledger.get("r1") == before
    assert [e.event for e in await ledger.events("r1")] == ["imported", "submitted"]


@pytest.mark.anyio
async def test_racing_moves_with_current_have_one_winner(ledger: Ledger) -> None:
    (row,) = await ledger.import_rows([new_row(1)])
    results = await asyncio.gather(
        *(
            ledger.transition(
                "r1", Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": f"p{i}"},
                event=f"try{i}", current=row,
            )
            for i in range(30)
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, LedgerRow)]
    assert len(wins) == 1
    assert all(isinstance(r, TransitionConflict) for r in results if r not in wins)
    assert await ledger.get("r1") == wins[0]


@pytest.mark.anyio
async def test_current_of_another_row_is_refused_before_writing(ledger: Ledger) -> None:
    one, two = await ledger.import_rows([new_row(1), new_row(2)])
    with pytest.raises(LedgerError, match="current") as info:
        await ledger.transition("r1", Stage.PENDING, Stage.PROJECT_CREATED, event="x", current=two)
    assert not isinstance(info.value, TransitionConflict)
    assert await ledger.get("r1") == one and await ledger.get("r2") == two
    assert [e.event for e in await ledger.events("r1")] == ["imported"]


@pytest.mark.anyio
async def test_events_are_the_rows_history_in_order(backend: Backend, ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1)])
    row = await ledger.transition(
        "r1",
        Stage.PENDING,
        Stage.SUBMITTED,
        {"generation_id": "g"},
        event="submitted",
        detail={"replay": False},
    )
    await ledger.transition(
        "r1",
        Stage.SUBMITTED,
        Stage.SUBMITTED,
        {"polls_delta": 1},
        event="polled",
        detail={"apiStatus": "processing"},
        current=row,
    )
    await ledger.transition("r1", Stage.SUBMITTED, Stage.COMPLETE, event="complete")
    events = await ledger.events("r1")
    assert [(e.from_stage, e.to_stage, e.event) for e in events] == [
        (None, Stage.PENDING, "imported"),
        (Stage.PENDING, Stage.SUBMITTED, "submitted"),
        (Stage.SUBMITTED, Stage.SUBMITTED, "polled"),
        (Stage.SUBMITTED, Stage.COMPLETE, "complete"),
    ]
    assert events[1].detail == {"replay": False}
    assert events[2].detail == {"apiStatus": "processing"}
    assert all(e.row_id == "r1" and e.run_id == "run-1" for e in events)
    times = [e.at for e in events]
    assert times == sorted(times) and len(set(times)) == 4
    assert await ledger.events("nope") == []


@pytest.mark.anyio
async def test_rows_come_in_line_order_across_pages(ledger: Ledger) -> None:
    lines = list(range(1, 4 * PAGE + 3))
    random.Random(7).shuffle(lines)
    for chunk in (lines[:10], lines[10:]):
        await ledger.import_rows([new_row(i) for i in chunk])
    got = [r.line async for r in ledger.rows()]
    assert got == sorted(lines)
    for i in range(1, 4 * PAGE + 3, 3):
        await ledger.transition(
            f"r{i}",
            Stage.PENDING,
            Stage.FAILED,
            {"error": {"code": "x", "message": "y"}},
            event="f",
        )
    failed = [r.line async for r in ledger.rows(stages=frozenset({Stage.FAILED}))]
    assert failed == list(range(1, 4 * PAGE + 3, 3))
    both = [r.line async for r in ledger.rows(stages=frozenset({Stage.FAILED, Stage.PENDING}))]
    assert both == sorted(lines)
    assert [r async for r in ledger.rows(stages=frozenset({Stage.COMPLETE}))] == []
    assert [r async for r in ledger.rows(stages=frozenset())] == []


@pytest.mark.anyio
async def test_rows_with_one_line_are_ordered_by_row_id_and_not_repeated(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(i, line=5, row_id=f"x{i:02d}") for i in range(3 * PAGE)])
    got = [r.row_id async for r in ledger.rows()]
    assert got == sorted(got) and len(got) == len(set(got)) == 3 * PAGE


@pytest.mark.anyio
async def test_rows_missing_from_the_manifest_are_retired(backend: Backend) -> None:
    led = await backend.open()
    await led.import_rows([new_row(i) for i in range(1, 2 * PAGE + 1)])
    assert await led.finish_import() == 0
    await led.close(0)

    led = await backend.open()
    kept = [i for i in range(1, 2 * PAGE + 1) if i % 3]
    await led.import_rows([new_row(i) for i in kept])
    gone = 2 * PAGE - len(kept)
    assert await led.finish_import() == gone
    assert [r.line async for r in led.rows()] == kept
    everything = [r async for r in led.rows(include_retired=True)]
    assert len(everything) == 2 * PAGE
    assert {r.line for r in everything if r.retired} == {
        i for i in range(1, 2 * PAGE + 1) if i % 3 == 0
    }
    assert sum((await led.counts()).values()) == len(kept)
    assert sum((await led.counts(include_retired=True)).values()) == 2 * PAGE
    assert await led.finish_import() == 0  # already retired
    await led.close(0)

    led = await backend.open()  # a row that comes back is active again
    (back,) = await led.import_rows([new_row(3)])
    assert back.retired is False
    await led.close(0)


@pytest.mark.anyio
async def test_counts_and_error_summary(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(i) for i in range(1, 8)])
    errs = [
        ("serverError", "boom"),
        ("serverError", "boom"),
        ("serverError", "boom"),
        ("notFound", "no project"),
        ("notFound", "no project"),
        ("conflict", "key reused"),
    ]
    for i, (code, msg) in enumerate(errs, start=1):
        await ledger.transition(
            f"r{i}",
            Stage.PENDING,
            Stage.FAILED,
            {"error": {"code": code, "message": msg, "httpStatus": 500}},
            event="failed",
        )
    counts = await ledger.counts()
    assert counts == {**dict.fromkeys(Stage, 0), Stage.FAILED: 6, Stage.PENDING: 1}
    assert await ledger.error_summary() == [
        ("serverError", "boom", 3),
        ("notFound", "no project", 2),
        ("conflict", "key reused", 1),
    ]
    assert await ledger.error_summary(limit=1) == [("serverError", "boom", 3)]


@pytest.mark.anyio
async def test_export_record_has_the_contract_fields(ledger: Ledger) -> None:
    await ledger.import_rows(
        [
            new_row(1),
            new_row(2, kind=Kind.FILE, api_project_id=None, source_path="/in/a.wav"),
        ]
    )
    await ledger.transition(
        "r1",
        Stage.PENDING,
        Stage.SUBMITTED,
        {"generation_id": "gen-1", "api_status": "queued", "attempts_delta": 1},
        event="submitted",
    )
    await ledger.transition(
        "r2", Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": "p2"}, event="project"
    )
    await ledger.transition("r2", Stage.PROJECT_CREATED, Stage.UPLOADED, event="uploaded")
    await ledger.transition(
        "r2", Stage.UPLOADED, Stage.SUBMITTED, {"generation_id": "gen-2"}, event="submitted"
    )
    await ledger.transition(
        "r2",
        Stage.SUBMITTED,
        Stage.COMPLETE,
        {"output_path": "/out/a.wav", "output_sha256": "cc", "api_status": "complete"},
        event="done",
    )
    records = [r.export_record() async for r in ledger.rows()]
    contract = {
        "rowId",
        "line",
        "idempotencyKey",
        "apiProjectId",
        "generationId",
        "modelKey",
        "status",
        "apiStatus",
        "error",
        "output",
        "attempts",
    }
    assert all(contract <= set(rec) for rec in records)
    one, two = records
    assert one == {
        **one,
        "rowId": "r1",
        "line": 1,
        "idempotencyKey": "key-1",
        "apiProjectId": "proj-1",
        "generationId": "gen-1",
        "modelKey": "diffio-3.5",
        "status": "submitted",
        "apiStatus": "queued",
        "error": None,
        "output": None,
        "attempts": 1,
    }
    assert two["status"] == "complete" and two["output"] == "/out/a.wav"
    assert two["apiProjectId"] == "p2"


# -- lifecycle ----------------------------------------------------------------


@pytest.mark.anyio
async def test_runs_are_recorded_with_their_end(backend: Backend) -> None:
    led = await backend.open(run_id="first")
    await led.close(1)
    led = await backend.open(run_id="second")
    runs = await led.runs()
    assert [r["run_id"] for r in runs] == ["first", "second"]
    first = runs[0]
    assert (first["pid"], first["host"], first["command"]) == (4242, "host-a", "batcher run m.csv")
    assert first["started_at"] == 1_000.0 and first["exit_code"] == 1
    assert first["ended_at"] is not None and runs[1]["ended_at"] is None
    await led.close(0)
    await led.close(0)  # twice is fine


@pytest.mark.anyio
async def test_read_only_open_reads_but_never_writes(backend: Backend) -> None:
    led = await backend.open()
    await led.import_rows([new_row(1)])
    await led.close(0)
    ro = await backend.open(lock=False, run_id="status")
    assert (await ro.get("r1")) is not None
    assert [r.row_id async for r in ro.rows()] == ["r1"]
    with pytest.raises(LedgerError):
        await ro.import_rows([new_row(2)])
    with pytest.raises(LedgerError):
        await ro.transition("r1", Stage.PENDING, Stage.PROJECT_CREATED, event="x")
    with pytest.raises(LedgerError):
        await ro.finish_import()
    assert [r["run_id"] for r in await ro.runs()] == ["run-1"]  # a reader is not a run
    await ro.close()


@pytest.mark.anyio
async def test_a_closed_ledger_refuses_work(backend: Backend) -> None:
    led = await backend.open()
    await led.close(0)
    with pytest.raises(LedgerError):
        await led.transition("r1", Stage.PENDING, Stage.PROJECT_CREATED, event="x")
    with pytest.raises(LedgerError):
        await led.get("r1")


@pytest.mark.anyio
async def test_bad_json_is_refused_before_anything_is_written(ledger: Ledger) -> None:
    await ledger.import_rows([new_row(1)])
    with pytest.raises(LedgerError, match="JSON"):
        await ledger.transition(
            "r1", Stage.PENDING, Stage.PROJECT_CREATED, event="x", detail={"when": object()}
        )
    assert (await ledger.get("r1")).stage is Stage.PENDING  # type: ignore[union-attr]


# -- leases -------------------------------------------------------------------


@pytest.mark.anyio
async def test_only_shared_ledgers_lease(backend: Backend, ledger: Ledger) -> None:
    # PostgreSQL is shared by design; SQLite and MemoryLedger() are one run's.
    assert ledger.shared is (backend.name == "postgres") is is_shared(ledger)
    if backend.name == "memory":
        await ledger.import_rows([new_row(1)])
        with pytest.raises(LedgerError, match="private"):
            await ledger.register_worker("a", WORKER_RUN, TTL)  # type: ignore[attr-defined]
        with pytest.raises(LedgerError, match="private"):
            await ledger.pending_work()  # type: ignore[attr-defined]
        with pytest.raises(LedgerError, match="private"):
            MemoryLedger().connect()
    if backend.name == "sqlite":
        assert not hasattr(ledger, "lease")


@pytest.mark.anyio
async def test_runs_on_one_shared_ledger_share_rows_and_split_them(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    other = await shared_backend.open_shared()
    try:
        await shared.import_rows([new_row(i) for i in range(1, 5)])
        # the second run imports the same manifest: one copy of each row
        assert [r.row_id for r in await other.import_rows([new_row(i) for i in range(1, 5)])] == [
            "r1", "r2", "r3", "r4"
        ]
        assert sum((await other.counts()).values()) == 4
        await shared.register_worker("a", WORKER_RUN, TTL)
        await other.register_worker("b", WORKER_RUN, TTL)
        assert await lease_all(shared, "a", 2) == ["r1", "r2"]
        assert await lease_all(other, "b") == ["r3", "r4"]
        moved = await other.transition("r3", Stage.PENDING, Stage.SUBMITTED, event="s")
        assert await shared.get("r3") == moved
        # neither run retires what the other has seen
        assert await shared.finish_import() == 0 and await other.finish_import() == 0
        runs = {r["run_id"] for r in await other.runs()}
        assert len(runs) == 2
    finally:
        await other.close(0)

@pytest.mark.anyio
async def test_two_hosts_replacing_one_project_never_overwrite_each_other(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    # Each host reads the PROJECT row itself (its own connection), then
    # replaces the project: the second write compares the version it read.
    other = await shared_backend.open_shared()
    try:
        (row,) = await shared.import_rows([new_row(1, kind=Kind.FILE)])
        await shared.transition("r1", Stage.PENDING, Stage.PROJECT_CREATED,
                                {"api_project_id": "p-old"}, event="p", current=row)
        seen_a, seen_b = await shared.get("r1"), await other.get("r1")
        assert seen_a is not None and seen_b is not None and seen_a == seen_b
        won = await shared.transition("r1", Stage.PROJECT_CREATED, Stage.PROJECT_CREATED,
                                      {"api_project_id": "p-a"}, event="fresh-a",
                                      current=seen_a)
        with pytest.raises(TransitionConflict):
            await other.transition("r1", Stage.PROJECT_CREATED, Stage.PROJECT_CREATED,
                                   {"api_project_id": "p-b"}, event="fresh-b", current=seen_b)
        assert await other.get("r1") == won and won.api_project_id == "p-a"
    finally:
        await other.close(0)


TTL = 60.0
WORKER_RUN = RunInfo("run-w", 4343, "host-b", 1_000.0, "batcher run m.csv")


async def lease_all(led: LeasingLedger, worker: str, limit: int = 100) -> list[str]:
    return [r.row_id for r in await led.lease(worker, limit, TTL)]


@pytest.mark.anyio
async def test_lease_hands_out_free_leaders_in_line_order_once(shared: LeasingLedger) -> None:
    # lines run against the row ids: r7 is line 3, r1 line 9; r3 leads r1
    await shared.import_rows(
        [new_row(i, line=10 - i, group="g" if i in (1, 3) else f"g{i}") for i in range(7, 0, -1)]
    )
    assert (await shared.get("r1")).leader_row_id == "r3"  # type: ignore[union-attr]
    await shared.transition(
        "r5", Stage.PENDING, Stage.FAILED, {"error": {"code": "x"}}, event="failed"
    )
    await drive(shared, "r6", Stage.COMPLETE)
    await shared.register_worker("a", WORKER_RUN, TTL)
    await shared.register_worker("b", WORKER_RUN, TTL)
    assert await shared.pending_work() == (4, 0)  # r7, r4, r3, r2
    first = await shared.lease("a", 2, TTL)
    assert [r.row_id for r in first] == ["r7", "r4"]
    assert first == [await shared.get("r7"), await shared.get("r4")]  # leasing is no update
    assert await lease_all(shared, "b") == ["r3", "r2"]
    assert await lease_all(shared, "a") == []  # nothing free; its own rows are not re-leased
    assert await lease_all(shared, "b", 0) == []
    assert await shared.pending_work() == (0, 4)
    # a row that leaves the active stages is no longer pending work
    await shared.transition("r7", Stage.PENDING, Stage.SUBMITTED, event="submitted")
    await shared.transition("r7", Stage.SUBMITTED, Stage.COMPLETE, event="done")
    assert await shared.pending_work() == (0, 3)
    assert [e.event for e in await shared.events("r4")] == ["imported"]  # no takeover


@pytest.mark.anyio
async def test_retired_rows_are_not_leased(shared_backend: Backend) -> None:
    led = await shared_backend.open_shared()
    await led.import_rows([new_row(i) for i in range(1, 4)])
    await led.close(0)
    led = await shared_backend.open_shared()
    await led.import_rows([new_row(1), new_row(3)])
    assert await led.finish_import() == 1
    await led.register_worker("a", WORKER_RUN, TTL)
    assert await lease_all(led, "a") == ["r1", "r3"]
    assert await led.pending_work() == (0, 2)
    await led.close(0)


@pytest.mark.anyio
async def test_expired_lease_is_taken_over_and_recorded(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    await shared.import_rows([new_row(i) for i in range(1, 4)])
    await shared.transition(
        "r2", Stage.PENDING, Stage.SUBMITTED, {"generation_id": "g2"}, event="submitted"
    )
    await shared.register_worker("a", WORKER_RUN, TTL)
    await shared.register_worker("b", WORKER_RUN, TTL)
    assert await lease_all(shared, "a") == ["r1", "r2", "r3"]
    assert await lease_all(shared, "b") == []
    await shared_backend.advance(TTL / 2)
    assert await shared.heartbeat("b", TTL) == 2
    assert await lease_all(shared, "b") == []  # a's leases have not expired yet
    await shared_backend.advance(TTL)  # a stopped heartbeating: it is dead, its leases expired
    assert await shared.heartbeat("b", TTL) == 1
    assert [w["worker_id"] for w in await shared.live_workers()] == ["b"]
    assert await shared.pending_work() == (3, 0)
    taken = await shared.lease("b", 10, TTL)
    assert [r.row_id for r in taken] == ["r1", "r2", "r3"]
    assert taken[1].stage is Stage.SUBMITTED and taken[1].generation_id == "g2"  # resumable
    last = (await shared.events("r2"))[-1]
    assert (last.from_stage, last.to_stage, last.event) == (
        Stage.SUBMITTED,
        Stage.SUBMITTED,
        LEASE_TAKEN_OVER,
    )
    assert last.detail["previousOwner"] == "a" and last.detail["owner"] == "b"
    assert last.detail["leaseExpiredAt"] < last.at
    assert await shared.pending_work() == (0, 3)
    # a comes back: it is live again but the rows stay with b
    assert await shared.heartbeat("a", TTL) == 2
    assert await lease_all(shared, "a") == []
    await shared_backend.advance(TTL + 1)  # now b dies; a re-takes them
    assert await lease_all(shared, "a") == ["r1", "r2", "r3"]
    assert (await shared.events("r1"))[-1].detail["previousOwner"] == "b"


@pytest.mark.anyio
async def test_heartbeat_renews_leases_and_counts_live_workers(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    await shared.import_rows([new_row(i) for i in range(1, 4)])
    await shared.register_worker("a", WORKER_RUN, TTL)
    await shared.register_worker("b", WORKER_RUN, TTL)
    assert await shared.heartbeat("a", TTL) == 2
    assert await lease_all(shared, "a", 2) == ["r1", "r2"]
    await shared_backend.advance(TTL * 2 / 3)
    assert await shared.heartbeat("a", TTL) == 2
    await shared_backend.advance(TTL * 2 / 3)  # b's heartbeat is older than its ttl now
    assert await shared.heartbeat("a", TTL) == 1
    # a's first leases would have expired; its heartbeats renewed them
    await shared.register_worker("c", WORKER_RUN, TTL)
    assert await lease_all(shared, "c") == ["r3"]
    live = await shared.live_workers()
    assert [(w["worker_id"], w["leases"]) for w in live] == [("a", 2), ("c", 1)]
    assert (live[0]["host"], live[0]["pid"], live[0]["run_id"]) == ("host-b", 4343, "run-w")
    assert live[0]["ttl"] == TTL and live[0]["heartbeat_at"] > live[0]["started_at"]
    assert await shared.heartbeat("c", 5.0) == 2
    await shared_backend.advance(10.0)  # c declared a 5 s ttl: dead; a is not
    assert [w["worker_id"] for w in await shared.live_workers()] == ["a"]
    assert await lease_all(shared, "a") == ["r3"]


@pytest.mark.anyio
async def test_release_and_deregister_give_rows_back(shared: LeasingLedger) -> None:
    await shared.import_rows([new_row(i) for i in range(1, 5)])
    await shared.register_worker("a", WORKER_RUN, TTL)
    await shared.register_worker("b", WORKER_RUN, TTL)
    assert await lease_all(shared, "a", 3) == ["r1", "r2", "r3"]
    await shared.release("a", ["r1", "nope"])
    await shared.release("b", ["r2"])  # not b's: left alone
    assert await shared.pending_work() == (2, 2)
    assert await lease_all(shared, "b") == ["r1", "r4"]
    await shared.deregister_worker("a")
    await shared.deregister_worker("never-registered")
    assert await lease_all(shared, "b") == ["r2", "r3"]
    assert all(e.event != LEASE_TAKEN_OVER for e in await shared.events("r2"))  # given back
    assert [w["worker_id"] for w in await shared.live_workers()] == ["b"]
    with pytest.raises(LedgerError, match="not registered"):
        await shared.heartbeat("a", TTL)
    with pytest.raises(LedgerError, match="not registered"):
        await shared.lease("a", 1, TTL)
    await shared.register_worker("a", WORKER_RUN, TTL)  # registering again is fine
    assert await shared.heartbeat("a", TTL) == 2


@pytest.mark.anyio
async def test_concurrent_leases_are_disjoint_and_cover_every_row(shared: LeasingLedger) -> None:
    n = 60
    await shared.import_rows([new_row(i) for i in range(n)])
    workers = ["a", "b", "c"]
    for w in workers:
        await shared.register_worker(w, WORKER_RUN, TTL)

    async def take(worker: str) -> list[str]:
        got: list[str] = []
        while batch := await lease_all(shared, worker, 4):
            got += batch
            await asyncio.sleep(0)
        return got

    shares = await asyncio.gather(*(take(w) for w in workers))
    flat = [rid for share in shares for rid in share]
    assert len(flat) == len(set(flat)) == n
    assert await shared.pending_work() == (0, n)
    live = {w["worker_id"]: w["leases"] for w in await shared.live_workers()}
    assert live == {w: len(share) for w, share in zip(workers, shares, strict=True)}


@pytest.mark.anyio
async def test_a_lease_taken_over_after_expiry_is_refused_to_its_old_holder(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    await shared.import_rows([new_row(1), new_row(2)])
    await shared.register_worker("a", WORKER_RUN, TTL)
    await shared.register_worker("b", WORKER_RUN, TTL)
    (held,) = await shared.lease("a", 1, TTL)
    assert await shared.hold("a", "r1", TTL) is True
    assert await shared.hold("b", "r1", TTL) is False  # not b's
    await shared_backend.advance(TTL * 0.75)
    assert await shared.hold("a", "r1", TTL) is True  # renewed: good for TTL from now
    await shared_backend.advance(TTL * 0.75)
    assert await lease_all(shared, "b") == ["r2"]  # r1 still a's
    await shared_backend.advance(TTL + 1)  # a is paused: no heartbeat, no hold
    assert await shared.heartbeat("b", TTL) == 1
    (taken,) = await shared.lease("b", 1, TTL)
    assert taken.row_id == "r1" and (await shared.events("r1"))[-1].event == LEASE_TAKEN_OVER
    # a wakes up: before its next paid request it asks, and learns the row is gone
    assert await shared.heartbeat("a", TTL) == 2
    assert await shared.hold("a", "r1", TTL) is False
    assert await shared.hold("b", "r1", TTL) is True
    moved = await shared.transition(
        "r1", Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": "p-b"}, event="b",
        current=taken,
    )
    with pytest.raises(TransitionConflict):  # and a's copy can no longer write
        await shared.transition(
            "r1", Stage.PENDING, Stage.PROJECT_CREATED, {"api_project_id": "p-a"}, event="a",
            current=held,
        )
    assert await shared.get("r1") == moved
    await shared.release("b", ["r1"])
    assert await shared.hold("b", "r1", TTL) is False  # given back
    assert await shared.hold("a", "nope", TTL) is False


@pytest.mark.anyio
async def test_a_lease_that_ran_out_is_gone_even_if_nobody_took_it(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    await shared.import_rows([new_row(1)])
    await shared.register_worker("a", WORKER_RUN, TTL)
    assert await lease_all(shared, "a") == ["r1"]
    await shared_backend.advance(TTL + 1)
    # neither a heartbeat nor a hold brings an expired lease back ...
    await shared.heartbeat("a", TTL)
    assert await shared.hold("a", "r1", TTL) is False
    assert await shared.pending_work() == (1, 0)
    # ... but the worker may lease the row again like anyone (no takeover: it was a's)
    assert await lease_all(shared, "a") == ["r1"]
    assert [e.event for e in await shared.events("r1")] == ["imported"]


@pytest.mark.anyio
async def test_lease_expiry_is_judged_by_the_ledgers_clock_not_the_hosts(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    await shared.import_rows([new_row(1), new_row(2)])
    # Two hosts whose clocks are far off: one in 1970, one decades ahead.
    slow = await shared_backend.open_shared(wall=lambda: 1.0)
    fast = await shared_backend.open_shared(wall=lambda: 4_000_000_000.0)
    try:
        await slow.register_worker("slow", WORKER_RUN, TTL)
        await fast.register_worker("fast", WORKER_RUN, TTL)
        assert await lease_all(slow, "slow", 1) == ["r1"]
        assert await fast.heartbeat("fast", TTL) == 2  # the slow host is live
        assert await lease_all(fast, "fast") == ["r2"]  # r1 is not expired for the ledger
        assert await fast.pending_work() == (0, 2)
        assert await slow.hold("slow", "r1", TTL) is True
        assert {w["worker_id"]: w["leases"] for w in await fast.live_workers()} == {
            "slow": 1, "fast": 1
        }
        await shared_backend.advance(TTL + 1)  # for the ledger, every lease ran out
        assert await fast.heartbeat("fast", TTL) == 1
        assert await lease_all(fast, "fast") == ["r1", "r2"]
        assert await slow.hold("slow", "r1", TTL) is False
        assert (await fast.events("r1"))[-1].detail["previousOwner"] == "slow"
    finally:
        await slow.close(0)
        await fast.close(0)


# -- the shared pace of requests --------------------------------------------------


@pytest.mark.anyio
async def test_the_pace_hands_out_one_schedule_to_every_host(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    with pytest.raises(LedgerError, match="no rate"):
        await shared.claim_slots(1, lead=0.05, margin=0.0)
    first = await shared.claim_slots(3, lead=0.05, margin=0.0, rate=10)
    assert (first.count, first.rate, first.max_rate) == (3, 10, 10)
    assert first.spacing == pytest.approx(0.1)
    assert first.first_at == pytest.approx(first.now + 0.05)  # a fresh pace starts now
    other = await shared_backend.open_shared()
    try:
        second = await other.claim_slots(2, lead=0.05, margin=0.0)
        # the other host's block starts where the first ended (or now, if later)
        assert second.first_at == pytest.approx(
            max(first.first_at + 3 * first.spacing, second.now + 0.05)
        )
        await shared_backend.advance(100)
        idle = await other.claim_slots(1, lead=0.05, margin=0.0)
        assert idle.first_at == pytest.approx(idle.now + 0.05)  # no credit for idle time
        # rounding: 2.5/s is 2 per second; under one a second, the rate itself
        assert (await shared.claim_slots(1, lead=0, margin=0.04, rate=2.5)).spacing == (
            pytest.approx(1.04 / 2)
        )
        assert (await shared.claim_slots(1, lead=0, margin=0.0, rate=0.5)).spacing == 2.0
        with pytest.raises(LedgerError):
            await shared.claim_slots(1, lead=0, margin=0, rate=0)
    finally:
        await other.close(0)


@pytest.mark.anyio
async def test_concurrent_claims_never_share_a_slot(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    hosts = [shared] + [await shared_backend.open_shared() for _ in range(2)]
    await shared.claim_slots(0, lead=0, margin=0.0, rate=20)
    try:

        async def claim(led: LeasingLedger, n: int) -> list[float]:
            got: list[float] = []
            for _ in range(10):
                c = await led.claim_slots(n, lead=0.01, margin=0.0)
                got += [c.first_at + i * c.spacing for i in range(c.count)]
            return got

        blocks = await asyncio.gather(*(claim(led, n) for n, led in enumerate(hosts, 1)))
        slots = sorted(t for block in blocks for t in block)
        assert len(slots) == 10 * (1 + 2 + 3)
        gaps = [b - a for a, b in itertools.pairwise(slots)]
        assert min(gaps) >= 0.05 - 1e-6  # 1/20 s apart, whoever claimed them
    finally:
        for led in hosts[1:]:
            await led.close(0)


@pytest.mark.anyio
async def test_a_429_pauses_every_host_and_halves_the_rate_once(
    shared_backend: Backend, shared: LeasingLedger
) -> None:
    await shared.claim_slots(0, lead=0, margin=0.0, rate=10)
    hit = await shared.claim_slots(0, lead=0, margin=0.0, pause=5.0)
    assert hit.rate == 5 and hit.paused_until == pytest.approx(hit.now + 5.0)
    other = await shared_backend.open_shared()
    try:
        # the other host's next slot waits for the pause; the 429s of requests
        # already in flight answer the same overload: no second cut
        again = await other.claim_slots(1, lead=0, margin=0.0, pause=5.0)
        assert again.rate == 5 and again.first_at >= hit.paused_until
        assert again.paused_until == pytest.approx(again.now + 5.0)
        assert again.spacing == pytest.approx(0.2)
        await shared_backend.advance(5 + 4)  # 4 s after the pause: 5 + 10/20 * 4
        grown = await other.claim_slots(0, lead=0, margin=0.0)
        assert grown.rate == pytest.approx(5 + (grown.now - again.paused_until) / 2)
        assert grown.rate == pytest.approx(7, abs=0.5)
        await shared_backend.advance(20)
        assert (await shared.claim_slots(0, lead=0, margin=0.0)).rate == 10  # recovered
        # a new ceiling: higher at once when not recovering, lower at once always
        assert (await shared.claim_slots(0, lead=0, margin=0.0, rate=40)).rate == 40
        await shared.claim_slots(0, lead=0, margin=0.0, pause=0.0)
        cut = await shared.claim_slots(0, lead=0, margin=0.0, rate=100)
        assert cut.max_rate == 100 and cut.rate == pytest.approx(20, abs=1)  # recovering
        assert (await other.claim_slots(0, lead=0, margin=0.0, rate=8)).rate == 8
    finally:
        await other.close(0)


@pytest.mark.anyio
async def test_a_read_only_ledger_refuses_lease_writes(shared_backend: Backend) -> None:
    led = await shared_backend.open_shared()
    await led.import_rows([new_row(1)])
    await led.register_worker("a", WORKER_RUN, TTL)
    await led.close(0)
    ro = await shared_backend.open_shared(lock=False, run_id="status")
    assert await ro.pending_work() == (1, 0)
    assert [w["worker_id"] for w in await ro.live_workers()] == ["a"]
    for call in (
        lambda: ro.register_worker("b", WORKER_RUN, TTL),
        lambda: ro.heartbeat("a", TTL),
        lambda: ro.lease("a", 1, TTL),
        lambda: ro.release("a", ["r1"]),
        lambda: ro.deregister_worker("a"),
    ):
        with pytest.raises(LedgerError):
            await call()
    await ro.close()


# -- upload sessions and their parts -----------------------------------------


SESSION = UploadSession("upls-9", "http://edge.test/edge", "secret-token", 8,
                        max_bytes=64, expires_at="2030-01-01T00:00:00Z")


async def _uploading(led: Ledger, upload_id: str = "upl-a") -> LedgerRow:
    """Row r1, a file row in PROJECT with ``SESSION`` and ``upload_id`` started."""
    (row,) = await led.import_rows([new_row(1, kind=Kind.FILE, api_project_id=None)])
    row = await led.transition("r1", Stage.PENDING, Stage.PROJECT_CREATED,
                               {"api_project_id": "proj-x", "upload_session": SESSION},
                               event="projectCreated", current=row)
    return await led.transition("r1", Stage.PROJECT_CREATED, Stage.PROJECT_CREATED,
                                {"upload_id": upload_id}, event="uploadStarted", current=row)


@pytest.mark.anyio
async def test_an_upload_session_is_kept_with_the_project_and_read_back(
        backend: Backend) -> None:
    async with backend.running() as led:
        row = await _uploading(led)
        assert (row.upload_session, row.upload_id) == (SESSION, "upl-a")
        assert await led.get("r1") == row
    # and by the next run, from the store
    async with backend.running() as led:
        stored = await led.get("r1")
        assert stored is not None and stored.upload_session == SESSION
        assert stored.upload_session.token == "secret-token" and stored.upload_id == "upl-a"
        # the token stays out of reprs (and so out of logs of the row)
        assert "secret-token" not in repr(stored)


@pytest.mark.anyio
async def test_parts_are_recorded_per_upload_by_number_and_replaced_when_sent_again(
        backend: Backend) -> None:
    async with backend.running() as led:
        await _uploading(led)
        for n in (2, 1, 3):
            await led.record_part("r1", "upl-a", UploadPart(n, f"e{n}", 8, f"s{n}"))
        await led.record_part("r1", "upl-a", UploadPart(2, "e2-again", 8, "s2-again"))
    async with backend.running() as led:
        parts = await led.upload_parts("r1", "upl-a")
        assert parts == [UploadPart(1, "e1", 8, "s1"), UploadPart(2, "e2-again", 8, "s2-again"),
                         UploadPart(3, "e3", 8, "s3")]
        assert await led.upload_parts("r1", "upl-other") == []
        assert await led.upload_parts("r2", "upl-a") == []


@pytest.mark.anyio
async def test_a_part_of_another_upload_or_a_row_moved_on_is_refused(ledger: Ledger) -> None:
    row = await _uploading(ledger)
    with pytest.raises(TransitionConflict):
        await ledger.record_part("r1", "upl-stale", UploadPart(1, "e", 8, "s"))
    with pytest.raises(TransitionConflict):
        await ledger.record_part("nope", "upl-a", UploadPart(1, "e", 8, "s"))
    # a fresh upload in the same session: parts of the old one are not its parts
    row = await ledger.transition("r1", Stage.PROJECT_CREATED, Stage.PROJECT_CREATED,
                                  {"upload_id": "upl-b"}, event="uploadStarted", current=row)
    with pytest.raises(TransitionConflict):
        await ledger.record_part("r1", "upl-a", UploadPart(1, "e", 8, "s"))
    await ledger.record_part("r1", "upl-b", UploadPart(1, "e", 8, "s"))
    await ledger.transition("r1", Stage.PROJECT_CREATED, Stage.UPLOADED,
                            {"upload_session": None, "upload_id": None}, event="uploaded",
                            current=row)
    with pytest.raises(TransitionConflict):
        await ledger.record_part("r1", "upl-b", UploadPart(2, "e", 8, "s"))
    assert await ledger.upload_parts("r1", "upl-a") == []
    assert [p.number for p in await ledger.upload_parts("r1", "upl-b")] == [1]
    await ledger.forget_parts("r1")
    assert await ledger.upload_parts("r1", "upl-b") == []


# -- webhook events ------------------------------------------------------------


def gen_event(generation: str, status: str, second: int, *, event_id: str = "") -> Any:
    from datetime import UTC, datetime

    from batcher.webhooks import GenerationEvent

    kinds = {"queued": "generation.queued", "processing": "generation.processing",
             "complete": "generation.completed", "error": "generation.failed"}
    return GenerationEvent.from_payload({
        "eventType": kinds[status], "eventId": event_id or f"evt-{generation}-{status}",
        "createdAt": datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC).isoformat(),
        "apiKeyId": "key_1", "generationId": generation, "status": status,
        "error": "It broke." if status == "error" else None})


@pytest.mark.anyio
async def test_webhook_events_are_kept_once_in_order_and_stale_ones_change_nothing(
        ledger: Ledger) -> None:
    from batcher.webhooks import Disposition

    await ledger.import_rows([new_row(1), new_row(2)])
    await ledger.transition("r1", Stage.PENDING, Stage.SUBMITTED,
                            {"generation_id": "gen-1", "api_status": "queued"}, event="submitted")
    await ledger.transition("r2", Stage.PENDING, Stage.SUBMITTED,
                            {"generation_id": "gen-2", "api_status": "processing"},
                            event="submitted")
    record = ledger.record_webhook_event
    assert await record(gen_event("gen-1", "processing", 2), "m1") is Disposition.RECORDED
    assert await record(gen_event("gen-1", "processing", 2), "m1") is Disposition.DUPLICATE
    assert await record(gen_event("gen-x", "complete", 3), "m2") is Disposition.UNKNOWN
    assert await record(gen_event("gen-1", "complete", 4), "m3") is Disposition.RECORDED
    # older after newer, and a terminal status after a terminal one: stale
    assert await record(gen_event("gen-1", "queued", 1), "m4") is Disposition.STALE
    assert await record(gen_event("gen-1", "error", 5), "m5") is Disposition.STALE
    # behind what a poll already wrote to the row: stale
    assert await record(gen_event("gen-2", "queued", 1), "m6") is Disposition.STALE
    assert await record(gen_event("gen-2", "error", 6), "m7") is Disposition.RECORDED
    assert await record(gen_event("gen-1", "processing", 2), "m3") is Disposition.DUPLICATE

    kept = await ledger.webhook_events_since(0)
    assert [(e.message_id, e.disposition.value) for e in kept] == [
        ("m1", "recorded"), ("m3", "recorded"), ("m4", "stale"), ("m5", "stale"),
        ("m6", "stale"), ("m7", "recorded")]
    assert [e.seq for e in kept] == sorted(e.seq for e in kept)
    assert kept[-1].event.error == "It broke." and kept[-1].event.generation_id == "gen-2"
    later = await ledger.webhook_events_since(kept[2].seq, limit=2)
    assert [e.message_id for e in later] == ["m5", "m6"]
    # the rows themselves are the run's to move: recording changes none
    row = await ledger.get("r1")
    assert row is not None and row.stage is Stage.SUBMITTED and row.api_status == "queued"


@pytest.mark.anyio
async def test_webhook_counters_add_up(ledger: Ledger) -> None:
    assert await ledger.webhook_counts() == {}
    await ledger.add_webhook_counts({"received": 3, "refused.badSignature": 1, "stale": 0})
    await ledger.add_webhook_counts({"received": 2})
    assert await ledger.webhook_counts() == {"received": 5, "refused.badSignature": 1}

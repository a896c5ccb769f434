"""The SQLite ledger: stdlib sqlite3, WAL, one writer thread with group commits.

Threads and connections:

* one **writer thread** owns the write connection and commits queued jobs in
  groups (:mod:`batcher.ledger.writer`): many transitions, one transaction,
  one fsync; a job that raises (a CAS conflict, an illegal move) fails only
  its own caller.
* one **read connection**, used through a single-thread anyio limiter, serves
  ``get``, ``rows``, ``counts`` and friends. WAL lets it read while the writer
  writes, in this process or in a ``batcher run`` holding the lock elsewhere.

Durability: ``synchronous=FULL``. In WAL mode NORMAL survives a process crash
but may lose the last commits on power loss; a lost "project created" or
"submitted" commit would make the resume create a second project and post a
second generation, i.e. pay twice. FULL fsyncs the WAL on every commit, and
group commit spreads that fsync over every transition in the batch.

This module holds the lifecycle, the import and the transitions; the reads
are in :mod:`batcher.ledger.sqlite_reads`, the upload parts in
:mod:`batcher.ledger.sqlite_parts` and the webhook events in
:mod:`batcher.ledger.sqlite_webhooks`, each a mixin of :class:`SqliteLedger`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import orjson

from batcher.errors import LedgerError, LedgerLocked
from batcher.ledger import codec
from batcher.ledger.base import NextMove
from batcher.ledger.lock import RunLock
from batcher.ledger.migrations import APPLIED_SQL, load_queries, migrate_sqlite, pending_migrations
from batcher.ledger.rules import Move, Refresh, import_refresh, plan_move, refusal
from batcher.ledger.sqlite_parts import SqliteUploadParts
from batcher.ledger.sqlite_reads import SqliteReads, records, stage_params
from batcher.ledger.sqlite_webhooks import SqliteWebhookEvents
from batcher.ledger.writer import GroupCommitWriter, Job, sqlite_error
from batcher.model import LedgerRow, NewRow, RunInfo, Stage, Update
from batcher.ops.logs import LEDGER_MIGRATED, event

__all__ = ["SqliteLedger"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUSY_TIMEOUT_S = 10.0
# What a transition returns when the caller passed ``current``: the columns
# the database computes; every other field of the new row is known already.
_COMPUTED = ", ".join(codec.COMPUTED)


# The writer connection's page cache, in KiB.
_WRITER_CACHE_KIB = 64 * 1024


def _connect(path: Path, *, query_only: bool) -> sqlite3.Connection:
    # Autocommit mode (isolation_level=None): transactions are explicit, so
    # the writer decides where a group commit begins and ends.
    conn = sqlite3.connect(
        str(path),
        isolation_level=None,
        check_same_thread=False,
        timeout=_BUSY_TIMEOUT_S,
        cached_statements=256,
    )
    if query_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


# -- the ledger ------------------------------------------------------------


class SqliteLedger(SqliteReads, SqliteUploadParts, SqliteWebhookEvents):
    """A :class:`~batcher.ledger.base.Ledger` in one SQLite file, private to one run.

    A run holds the file's lock (:mod:`batcher.ledger.lock`) while it writes,
    so nobody else competes for its rows: there are no leases here. (Ledgers
    written before leases were dropped keep their lease tables, unused.)

    ``batch_size`` caps the jobs of one group commit; ``page_size`` is the
    number of rows :meth:`rows` reads per query. An instance is opened once
    and closed once; open a new one to reopen the file.
    """

    def __init__(
        self,
        path: Path,
        *,
        wall: Callable[[], float] = time.time,
        batch_size: int = 512,
        page_size: int = 500,
    ) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        self.shared = False
        self._wall = wall
        self._batch_size = batch_size
        self._page_size = page_size
        self._q = load_queries()
        self._transition_cache: dict[tuple[bool, tuple[str, ...]], str] = {}
        self._lock = RunLock(self.path)
        self._writer: GroupCommitWriter | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_limiter: anyio.CapacityLimiter | None = None
        self._run: RunInfo | None = None
        self._state = "new"  # new -> open -> closed

    def __repr__(self) -> str:
        mode = "writer" if self._writer else "reader"
        return f"<SqliteLedger {str(self.path)!r} {self._state} {mode}>"

    @property
    def commit_stats(self) -> tuple[int, int]:
        """(transactions committed, jobs in them) by this instance's writer."""
        return (self._writer.commits, self._writer.jobs) if self._writer else (0, 0)

    # -- lifecycle ---------------------------------------------------------

    async def open(self, run: RunInfo, *, lock: bool = True) -> None:
        """Create or migrate the ledger, take the lock and record the run.

        With ``lock=False`` nothing is written (unless an old schema must be
        migrated while no run holds the lock) and the ledger can be read while
        another process runs on it.
        """
        if self._state != "new":
            raise LedgerError(f"{self.description} was already opened")
        self._state = "opening"
        self._run = run
        try:
            if lock:
                await anyio.to_thread.run_sync(self._open_writer, run)
            else:
                await anyio.to_thread.run_sync(self._check_readable, run)
            self._reader = await anyio.to_thread.run_sync(self._connect_reader)
        except BaseException:
            writer, self._writer = self._writer, None
            if writer is not None:  # never started: stopping it closes its connection
                writer.start()
                writer.stop()
                await anyio.to_thread.run_sync(writer.join)
            self._lock.release()
            self._state = "closed"
            raise
        self._read_limiter = anyio.CapacityLimiter(1)
        self._state = "open"
        if self._writer is not None:
            self._writer.start()

    def _connect_reader(self) -> sqlite3.Connection:
        try:
            return _connect(self.path, query_only=True)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self.path}: {exc}") from exc

    def _open_writer(self, run: RunInfo) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the folder of {self.path}: {exc}") from exc
        self._lock.acquire(run)
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(self.path, query_only=False)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"{self.path}: cannot use WAL journal (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            # The writer's page cache: rows and their indexes are keyed by
            # hashes, so a move touches pages all over the file, and with
            # SQLite's default 2 MB every move of a ledger of some ten
            # thousand rows read pages back from the OS (130 instead of
            # 45 us per move). It grows only as pages are used.
            conn.execute(f"PRAGMA cache_size = -{_WRITER_CACHE_KIB}")
            self._refuse_foreign(conn)
            applied = migrate_sqlite(conn, self._wall)
            if applied:
                log.info("ledger %s migrated to %s", self.path, applied,
                         extra=event(LEDGER_MIGRATED, ledger=str(self.path), versions=applied))
            conn.execute(
                self._q["insert_run"],
                {
                    "run_id": run.run_id,
                    "pid": run.pid,
                    "host": run.host,
                    "started_at": run.started_at,
                    "command": run.command,
                },
            )
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
            raise
        name = f"ledger-writer:{self.path.name}"
        self._writer = GroupCommitWriter(conn, self._batch_size, name=name, path=str(self.path))

    def _refuse_foreign(self, conn: sqlite3.Connection) -> None:
        """Never add our tables to some other application's database."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "ledger_migrations" not in tables:
            raise LedgerError(f"{self.path} is a SQLite database but not a batcher ledger")

    def _check_readable(self, run: RunInfo) -> None:
        if not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        try:
            conn = _connect(self.path, query_only=True)
            try:
                self._refuse_foreign(conn)
                tables = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'ledger_migrations'"
                ).fetchone()
                done = [r[0] for r in conn.execute(APPLIED_SQL)] if tables else []
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self.path}: {exc}") from exc
        if not pending_migrations("sqlite", done):
            return
        # An older schema: migrate it now if no run holds the ledger. A run
        # holding it has migrated it already, unless it is an older batcher.
        try:
            self._lock.acquire(run)
        except LedgerLocked as exc:
            raise LedgerError(
                f"ledger {self.path} needs a schema upgrade but is in use by {exc.holder}"
            ) from exc
        try:
            conn = _connect(self.path, query_only=False)
            try:
                conn.execute("PRAGMA synchronous = FULL")
                migrate_sqlite(conn, self._wall)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot migrate ledger {self.path}: {exc}") from exc
        finally:
            self._lock.release()

    async def close(self, exit_code: int | None = None) -> None:
        """Flush queued writes, record the run's end, release the lock.

        Safe to call twice; shielded from cancellation so that Ctrl-C still
        leaves every accepted write committed.
        """
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        self._state = "closed"
        with anyio.CancelScope(shield=True):
            writer, self._writer = self._writer, None
            try:
                if writer is not None:
                    run = self._run
                    assert run is not None
                    params = {"run_id": run.run_id, "exit_code": exit_code}
                    try:
                        await writer.submit(
                            lambda conn: conn.execute(
                                self._q["end_run"], {**params, "ended_at": self._wall()}
                            )
                        )
                    finally:
                        writer.stop()
                        await anyio.to_thread.run_sync(writer.join)
            finally:
                reader, self._reader = self._reader, None
                if reader is not None and self._read_limiter is not None:
                    async with self._read_limiter:
                        reader.close()
                self._lock.release()

    # -- job plumbing ------------------------------------------------------

    async def _write(self, fn: Job[T]) -> T:
        if self._state != "open":
            raise LedgerError(f"{self.description} is not open")
        if self._writer is None:
            raise LedgerError(f"{self.description} is open read-only")
        return await self._writer.submit(fn)

    async def _read(self, fn: Job[T]) -> T:
        if self._state != "open" or self._reader is None or self._read_limiter is None:
            raise LedgerError(f"{self.description} is not open")
        reader = self._reader
        try:
            return await anyio.to_thread.run_sync(fn, reader, limiter=self._read_limiter)
        except sqlite3.Error as exc:
            raise sqlite_error(exc, f"cannot read ledger {self.path}") from exc

    def _run_id(self) -> str:
        return self._run.run_id if self._run else ""

    def _insert_event(
        self,
        conn: sqlite3.Connection,
        row_id: str,
        at: float,
        from_stage: Stage | None,
        to_stage: Stage,
        event: str,
        detail: str,
    ) -> None:
        conn.execute(
            self._q["insert_event"],
            {
                "row_id": row_id,
                "at": at,
                "from_stage": from_stage.value if from_stage else None,
                "to_stage": to_stage.value,
                "event": event,
                "detail": detail,
                "run_id": self._run_id(),
            },
        )

    # -- import ------------------------------------------------------------

    async def import_rows(self, rows: Sequence[NewRow]) -> list[LedgerRow]:
        """Insert new rows, mark all seen in this run, in one transaction.

        See :meth:`Ledger.import_rows`. Besides ``retired``, a known row's
        ``line`` follows the manifest, so exports and paging show where the
        row is now. An invalid row refreshes a stored PENDING or FAILED row
        to FAILED with the new error; a stored ``invalidRow`` failure that
        comes valid (it never reached the API) restarts as PENDING with the
        new content. Any other known row is returned as stored.
        """
        prepared = [(new, codec.new_row_values(new)) for new in rows]
        if not prepared:
            return []

        def job(conn: sqlite3.Connection) -> list[LedgerRow]:
            return [self._import_one(conn, new, params) for new, params in prepared]

        return await self._write(job)

    def _import_one(
        self, conn: sqlite3.Connection, new: NewRow, params: dict[str, Any]
    ) -> LedgerRow:
        q = self._q
        now = self._wall()
        params["now"] = now
        params["run_id"] = self._run_id()
        # Insert first (a known row_id inserts nothing): a new row costs one
        # statement and no read-back; its record is what the insert wrote.
        stage = Stage.FAILED if new.error is not None else Stage.PENDING
        params["stage"] = stage.value
        params["leader_row_id"] = self._leader(conn, params)
        if conn.execute(q["insert_row"], params).rowcount == 1:
            detail = {"line": new.line, **({"error": new.error} if new.error else {})}
            self._insert_event(conn, new.row_id, now, None, stage, "imported", _json(detail))
            return codec.row_from_record(
                codec.inserted_record(params, stage, params["leader_row_id"], now))
        stored = codec.row_from_record(records(conn.execute(q["mark_seen"], params))[0])
        fresh_error = None if params["error"] is None else orjson.loads(params["error"])
        decision = import_refresh(stored.stage, stored.error, stored.generation_id, fresh_error)
        if decision is Refresh.INVALIDATE:
            to, statement, detail_json = Stage.FAILED, q["mark_invalid"], params["error"]
        elif decision is Refresh.REVALIDATE:
            params["leader_row_id"] = self._leader(conn, params)
            to, statement, detail_json = Stage.PENDING, q["revalidate_row"], "{}"
        else:
            return stored
        row = records(conn.execute(statement, params))[0]
        self._insert_event(conn, new.row_id, now, stored.stage, to, decision.value, detail_json)
        return codec.row_from_record(row)

    def _leader(self, conn: sqlite3.Connection, params: dict[str, Any]) -> str | None:
        if params["group_key"] is None:
            return None
        found = conn.execute(self._q["find_leader"], params).fetchone()
        return str(found[0]) if found else None

    async def finish_import(self) -> int:
        """Retire rows the current run's import did not see; return how many."""
        params = {"run_id": self._run_id()}

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(self._q["retire_unseen"], params).rowcount

        return await self._write(job)

    # -- transitions -------------------------------------------------------

    async def transition(
        self,
        row_id: str,
        expect: Stage | frozenset[Stage],
        to: Stage,
        update: Update | None = None,
        *,
        event: str,
        detail: Mapping[str, Any] | None = None,
        current: LedgerRow | None = None,
        then: NextMove | None = None,
    ) -> LedgerRow:
        """Compare-and-set ``row_id`` from ``expect`` to ``to``; see the Protocol.

        With ``current`` only the computed columns are read back (see
        :meth:`Ledger.transition`).
        """
        if then is not None and current is None:
            raise LedgerError(f"row {row_id}: a move with then= needs current=")
        move = plan_move(row_id, expect, to, update, detail, current)

        def job(conn: sqlite3.Connection) -> LedgerRow:
            row = self._move(conn, move, current, event)
            if then is None:
                return row
            # The second move, in the same SAVEPOINT: both commit or neither.
            second = plan_move(row_id, to, then.to, then.update, then.detail, row)
            return self._move(conn, second, row, then.event)

        return await self._write(job)

    def _move(self, conn: sqlite3.Connection, move: Move, current: LedgerRow | None,
              event: str) -> LedgerRow:
        """Make ``move`` on the writer's connection (inside its job); the row after it."""
        params = move.values
        ordered = sorted(move.allowed)
        sql = self._transition_sql(params, full=current is None)
        row_id, to = move.row_id, move.to

        def refused(conn: sqlite3.Connection) -> LedgerError:
            got = conn.execute(self._q["get_stage"], params).fetchone()
            if got is None:
                return refusal(move, None)
            return refusal(move, codec.STAGES[got[0]], got[1])

        if len(ordered) == 1:
            from_stage = ordered[0]
        else:
            got = conn.execute(self._q["get_stage"], params).fetchone()
            if got is None or codec.STAGES[got[0]] not in move.allowed:
                raise refused(conn)
            from_stage = codec.STAGES[got[0]]
        now = self._wall()
        params["now"] = now
        params.update(stage_params((from_stage,)))
        cursor = conn.execute(sql, params)
        # fetchall, not fetchone: it steps the statement to its end, so
        # it is reset and no statement is left running at RELEASE.
        found = next(iter(cursor.fetchall()), None)
        if found is None:
            raise refused(conn)
        self._insert_event(conn, row_id, now, from_stage, to, event, move.detail)
        if current is not None:
            return codec.moved(current, to, move.fields, found)
        names = [d[0] for d in cursor.description]
        return codec.row_from_record(dict(zip(names, found, strict=True)))
    def _transition_sql(self, params: Mapping[str, Any], *, full: bool) -> str:
        """The transition statement for the columns ``params`` sets.

        One text per set of columns, so sqlite3's statement cache keeps each;
        naming only the columns that change is twice as fast as one fixed
        statement with a CASE per column. ``full`` returns the whole row,
        otherwise only the computed columns.
        """
        key = (full, tuple(sorted(k for k in params if k in codec.SET_COLUMNS)))
        sql = self._transition_cache.get(key)
        if sql is None:
            assignments = "".join(f", {col} = :{col}" for col in key[1])
            sql = (
                self._q["transition"]
                .replace("{assignments}", assignments)
                .replace("{returning}", "*" if full else _COMPUTED)
            )
            self._transition_cache[key] = sql
        return sql


def _json(value: Mapping[str, Any]) -> str:
    return orjson.dumps(value).decode()

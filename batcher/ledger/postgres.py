"""The PostgreSQL ledger: one job shared by several hosts (asyncpg).

Same schema, same semantics and same contract tests as the SQLite ledger; what
differs is that many processes write at once, so every guarantee is made by
the database rather than by a file lock:

* **No run lock.** :meth:`PostgresLedger.open` records the run and takes an
  *import epoch* (a sequence number); it never excludes other runs. Hosts
  split the work through leases (:class:`~batcher.ledger.base.LeasingLedger`):
  ``SELECT … FOR UPDATE SKIP LOCKED`` hands each row to one worker, heartbeats
  renew the leases, and a dead host's rows are taken over when they expire.
* **One clock.** Leases, heartbeats and the shared pace read the database
  server's clock (the ``ledger_now()`` function), never a host's ``wall``,
  which only stamps rows, events and runs.
* **One pace.** The ``ledger_pace`` row is the schedule every host's requests
  are sent on (:meth:`PostgresLedger.claim_slots`), so the hosts together
  keep the job's rate.
* **Compare-and-set in one statement.** A transition locks the row, updates it
  only if its stage is one of the legal sources (and its version the
  caller's), and appends its event, all in one statement (so one round trip
  and one commit); zero rows is a TransitionConflict, exactly as on SQLite.
* **Idempotent, concurrent import.** Rows are inserted with
  ``ON CONFLICT DO NOTHING``: hosts importing one manifest at once end with one
  copy of each row. A group's leader is its first row by line among the rows
  of the manifest being imported, whichever host inserts it.
* **Retiring.** Each import raises a row's ``seen_seq`` to its run's epoch;
  :meth:`finish_import` retires rows below its own epoch, i.e. rows that no
  import by a run opened since this one has seen. Several hosts importing the
  same manifest never retire each other's rows; a host importing an older
  version of the manifest keeps rows a newer version dropped until it stops.
* **No group commit.** PostgreSQL commits concurrent transactions from a pool
  of connections and flushes their WAL together; about 2,700 transitions per
  second on a 2-core machine, far above any API rate.

The URL's password never appears in ``description``, reprs or errors.

This module holds the plumbing, the lifecycle, the import and the
transitions; the reads are in :mod:`batcher.ledger.postgres_reads`, the
upload parts in :mod:`batcher.ledger.postgres_parts`, the leases and the
pace in :mod:`batcher.ledger.postgres_leases` and the webhook events in
:mod:`batcher.ledger.postgres_webhooks`, each a mixin of
:class:`PostgresLedger`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import asyncpg

from batcher.errors import LedgerError, LedgerUnreachable
from batcher.ledger import codec
from batcher.ledger.base import NextMove, move_then_move
from batcher.ledger.migrations import pending_migrations
from batcher.ledger.postgres_import import BatchImport
from batcher.ledger.postgres_leases import PostgresLeases
from batcher.ledger.postgres_parts import PostgresUploadParts
from batcher.ledger.postgres_reads import PostgresReads
from batcher.ledger.postgres_sql import (
    PgUrl,
    Query,
    applied_versions,
    load_pg_queries,
    migrate_postgres,
    positional,
)
from batcher.ledger.postgres_webhooks import PostgresWebhookEvents
from batcher.ledger.rules import plan_move, refusal
from batcher.model import LedgerRow, NewRow, RunInfo, Stage, Update
from batcher.ops.logs import LEDGER_MIGRATED, LEDGER_RETRY, event

__all__ = ["PostgresLedger"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The columns a transition returns when the caller passed ``current``.
_COMPUTED = ", ".join(codec.COMPUTED)
_TRIES = 5
# What a broken connection or statement can raise; all become LedgerError.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
              OSError, TimeoutError)
# What passes: a lost or refused connection, a server restarting or shutting
# down (class 08, class 57: admin shutdown, cannot connect now), too many
# connections (53300). These become LedgerUnreachable, and the run waits.
_TRANSIENT = (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError,
              asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
              asyncpg.TooManyConnectionsError)
# Lost races between hosts; the whole transaction is safe to run again.
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


class PostgresLedger(PostgresReads, PostgresUploadParts, PostgresLeases,
                     PostgresWebhookEvents):
    """A :class:`~batcher.ledger.base.LeasingLedger` in a PostgreSQL database.

    ``url`` is a ``postgresql://`` (or ``postgres://``) URL; a ``schema=NAME``
    query parameter keeps the ledger in its own schema (created if missing),
    so one database can hold several jobs. ``pool_size`` caps the connections
    of this process; ``page_size`` is the number of rows :meth:`rows` fetches
    per query. An instance is opened once and closed once.
    """

    def __init__(
        self,
        url: str,
        *,
        wall: Callable[[], float] = time.time,
        pool_size: int = 4,
        page_size: int = 500,
        connect_timeout: float = 10.0,
    ) -> None:
        self._url = PgUrl.parse(url)
        self.description = self._url.shown
        self.shared = True
        self._wall = wall
        self._pool_size = pool_size
        self._page_size = page_size
        self._connect_timeout = connect_timeout
        self._sql = load_pg_queries()
        self._q = {name: positional(sql) for name, sql in self._sql.items()}
        self._transition_cache: dict[tuple[bool, tuple[str, ...]], Query] = {}
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._run: RunInfo | None = None
        self._writable = False
        self._epoch = 0
        self._state = "new"  # new -> opening -> open -> closed

    def __repr__(self) -> str:
        mode = "writer" if self._writable else "reader"
        return f"<PostgresLedger {self.description!r} {self._state} {mode}>"

    # -- plumbing ----------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, doing: str) -> Iterator[None]:
        """Turn database and network errors into LedgerError, password scrubbed."""
        try:
            yield
        except _DB_ERRORS as exc:
            raw = f"{type(exc).__name__}: {exc}"
            clean = self._url.scrub(raw)
            kind = LedgerUnreachable if isinstance(exc, _TRANSIENT) else LedgerError
            error = kind(f"{self.description}: cannot {doing}: {clean}")
            if clean != raw:  # the original would show the password in a traceback
                raise error from None
            raise error from exc

    async def _retrying(self, doing: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """Run a multi-row write; again if it lost a deadlock to another host.

        Statements that lock several rows lock them in row_id order, so this is
        for the rare orders nobody controls (two hosts importing one manifest
        in different orders). A lost transaction changed nothing.
        """
        for attempt in range(1, _TRIES + 1):
            try:
                with self._translate(doing):
                    return await attempt_once()
            except LedgerError as exc:
                if not isinstance(exc.__cause__, _RETRYABLE) or attempt == _TRIES:
                    raise
                log.info(
                    "ledger: %s failed (%s); trying again", doing, exc,
                    extra=event(LEDGER_RETRY, doing=doing, attempt=attempt, error=str(exc)),
                )
        raise AssertionError("unreachable")

    def _settings(self, *, read_only: bool) -> dict[str, str]:
        # Custom plans: asyncpg prepares every statement, and a generic plan
        # chosen while the table was small (a sequential scan) would stay
        # cached as it grows: the import slowed from 17,000 rows/s to 800
        # by 100,000 rows. Planning each execution costs a fraction of that.
        settings = {"application_name": "batcher", "plan_cache_mode": "force_custom_plan"}
        if self._url.schema is not None:
            settings["search_path"] = self._url.schema
        if read_only:
            settings["default_transaction_read_only"] = "on"
        return settings

    def _pool_for(self, *, write: bool) -> asyncpg.Pool[asyncpg.Record]:
        if self._state != "open" or self._pool is None:
            raise LedgerError(f"{self.description} is not open")
        if write and not self._writable:
            raise LedgerError(f"{self.description} is open read-only")
        return self._pool

    def _run_id(self) -> str:
        return self._run.run_id if self._run else ""

    async def _exec(self, name: str, params: Mapping[str, Any], doing: str) -> str:
        pool = self._pool_for(write=True)
        q = self._q[name]
        with self._translate(doing):
            return await pool.execute(q.text, *q.args(params))

    # -- lifecycle ---------------------------------------------------------

    async def open(self, run: RunInfo, *, lock: bool = True) -> None:
        """Migrate the schema (creating it), record the run, open the pool.

        ``lock=True`` does not lock anything on PostgreSQL: hosts share the
        ledger and split the rows by leases. It records the run and takes the
        run's import epoch. ``lock=False`` opens a read-only session (status,
        export); it migrates an older schema first, which is safe while runs
        are writing because each step holds the migration lock.
        """
        if self._state != "new":
            raise LedgerError(f"{self.description} was already opened")
        self._state = "opening"
        try:
            with self._translate("open the ledger"):
                await self._prepare(run, lock=lock)
                self._pool = await asyncpg.create_pool(
                    self._url.dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    timeout=self._connect_timeout,
                    server_settings=self._settings(read_only=not lock),
                )
        except BaseException:
            self._state = "closed"
            raise
        self._run = run
        self._writable = lock
        self._state = "open"

    async def _prepare(self, run: RunInfo, *, lock: bool) -> None:
        try:
            conn = await asyncpg.connect(
                self._url.dsn,
                timeout=self._connect_timeout,
                server_settings=self._settings(read_only=False),
            )
        except ValueError as exc:  # asyncpg's own DSN checks
            raise LedgerError(f"{self.description}: {self._url.scrub(str(exc))}") from None
        try:
            if not lock:
                done = await applied_versions(conn)
                if done is None:
                    raise LedgerError(f"no batcher ledger in {self.description}")
                if not pending_migrations("postgres", done):
                    return
            applied = await migrate_postgres(conn, self._wall, self._url.schema)
            if applied:
                log.info("ledger %s migrated to %s", self.description, applied,
                         extra=event(LEDGER_MIGRATED, ledger=self.description, versions=applied))
            if lock:
                q = self._q["insert_run"]
                await conn.execute(
                    q.text,
                    *q.args(
                        {
                            "run_id": run.run_id,
                            "pid": run.pid,
                            "host": run.host,
                            "started_at": run.started_at,
                            "command": run.command,
                        }
                    ),
                )
                self._epoch = int(await conn.fetchval(self._q["next_epoch"].text))
        finally:
            await conn.close()

    async def close(self, exit_code: int | None = None) -> None:
        """Record the run's end and close the pool; safe to call twice.

        Shielded from cancellation, so Ctrl-C still records the end.
        """
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        self._state = "closed"
        with anyio.CancelScope(shield=True):
            pool, self._pool = self._pool, None
            if pool is None:
                return
            try:
                if self._writable and self._run is not None:
                    q = self._q["end_run"]
                    params = {
                        "run_id": self._run.run_id,
                        "exit_code": exit_code,
                        "ended_at": self._wall(),
                    }
                    with self._translate("record the end of the run"):
                        await pool.execute(q.text, *q.args(params))
            finally:
                with anyio.move_on_after(10) as scope:
                    await pool.close()
                if scope.cancelled_caught:
                    pool.terminate()

    # -- import ------------------------------------------------------------

    async def import_rows(self, rows: Sequence[NewRow]) -> list[LedgerRow]:
        """Insert new rows, mark all seen by this run, in one transaction.

        See :meth:`Ledger.import_rows` and the module docstring. A batch that
        loses a deadlock or serialization race against another host's import
        is run again (it changed nothing).
        """
        prepared = [(new, codec.new_row_values(new)) for new in rows]
        pool = self._pool_for(write=True)
        if not prepared:
            return []
        batch = BatchImport(self._q, self._run_id(), self._epoch)

        async def attempt_once() -> list[LedgerRow]:
            async with pool.acquire() as conn, conn.transaction():
                return await batch.run(conn, prepared, self._wall())

        return await self._retrying("import rows", attempt_once)

    async def finish_import(self) -> int:
        """Retire rows no import since this run opened has seen; return how many."""
        pool = self._pool_for(write=True)
        q = self._q["retire_unseen"]
        with self._translate("retire rows"):
            status = await pool.execute(q.text, *q.args({"epoch": self._epoch}))
        return int(status.rsplit(" ", 1)[-1])

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
        if then is not None:
            return await move_then_move(self, row_id, expect, to, update, event=event,
                                        detail=detail, current=current, then=then)
        pool = self._pool_for(write=True)
        move = plan_move(row_id, expect, to, update, detail, current)
        params = {
            **move.values,
            "allowed": sorted(s.value for s in move.allowed),
            "event": event,
            "detail": move.detail,
            "run_id": self._run_id(),
            "now": self._wall(),
        }
        query = self._transition_query(params, full=current is None)
        with self._translate(f"update row {row_id}"):
            found = await pool.fetchrow(query.text, *query.args(params))
            if found is not None:
                if current is None:
                    return codec.row_from_record(found)
                return codec.moved(current, to, move.fields, tuple(found))
            got = await pool.fetchrow(self._q["get_stage"].text, row_id)
        # Not in expect (or at another version); or it was when we looked
        # again, after another host moved it away and back: either way this
        # move lost the race.
        if got is None:
            raise refusal(move, None)
        raise refusal(move, codec.STAGES[got["stage"]], got["version"])

    def _transition_query(self, params: Mapping[str, Any], *, full: bool) -> Query:
        """The statement for the columns ``params`` sets (one text per column set,
        so asyncpg's per-connection statement cache keeps each prepared).
        ``full`` returns the whole row, otherwise only the computed columns."""
        key = (full, tuple(sorted(k for k in params if k in codec.SET_COLUMNS)))
        query = self._transition_cache.get(key)
        if query is None:
            assignments = "".join(f", {col} = :{col}" for col in key[1])
            text = (
                self._sql["transition"]
                .replace("{assignments}", assignments)
                .replace("{returning}", "*" if full else _COMPUTED)
            )
            query = positional(text)
            self._transition_cache[key] = query
        return query

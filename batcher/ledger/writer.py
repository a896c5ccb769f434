"""A thread that owns one SQLite connection and commits queued jobs in groups.

Coroutines call :meth:`GroupCommitWriter.submit` with a job (a function of the
connection) and await the future it returns. The thread drains up to
``batch_size`` jobs, runs them in one ``BEGIN IMMEDIATE`` transaction,
commits once, then settles every caller's future with one hop to the event
loop (one wake-up per batch, not per caller).

Jobs run without savepoints first: a savepoint costs two statements per
job, and each statement hands the GIL to the event loop and back. If a job
raises, the whole transaction is rolled back and the batch runs again with
each job in its own SAVEPOINT, so a job that raises rolls back alone and
fails only its own caller. Jobs are functions of the connection, so running
one again after a rollback does what the first run would have done. A failed
COMMIT fails every job of the batch.

Under load the thread lingers ``linger`` seconds before it drains the queue,
so one commit takes what a few milliseconds bring: every commit writes each
page it touched and syncs the file, and rows share pages (the tables' and
indexes' ends, the inner pages). At a thousand requests a second this
halves the writer's CPU per row. It lingers only while busy (the last batch
held more than one job), so a lone write at a low rate is not delayed. A future resolves only after
its job is committed; a caller cancelled meanwhile does not undo its write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from batcher.errors import LedgerError, LedgerUnreachable
from batcher.ops.logs import LEDGER_COMMIT_FAILED, event

__all__ = ["GroupCommitWriter", "Job", "sqlite_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]


# SQLite's words for a failure that may pass: another process holds the
# database, or its disk is full (space may be freed), or I/O failed.
_TRANSIENT_WORDS = ("locked", "busy", "full", "disk i/o error", "unable to open")


def sqlite_error(exc: sqlite3.Error, doing: str) -> LedgerError:
    """``exc`` in the error tree: LedgerUnreachable when it may pass, naming the file."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and any(
            word in text.lower() for word in _TRANSIENT_WORDS):
        return LedgerUnreachable(f"{doing}: {text}")
    return LedgerError(f"{doing}: {text}")


class _Job(Generic[T]):
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self, fn: Job[T], future: asyncio.Future[T], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _settle(outcomes: list[_Outcome]) -> None:
    for future, result, exc in outcomes:
        if future.done():  # the caller was cancelled; the write stands
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


class GroupCommitWriter:
    """The one thread that writes through ``conn``; closes it when stopped."""

    def __init__(self, conn: sqlite3.Connection, batch_size: int, name: str,
                 path: str = "", *, linger: float = 0.005) -> None:
        self._conn = conn
        self._path = path or name
        self._batch_size = batch_size
        self._linger = linger
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.commits = 0
        self.jobs = 0

    def start(self) -> None:
        """Start the thread; jobs submitted before are kept in the queue."""
        self._thread.start()

    def submit(self, fn: Job[T]) -> asyncio.Future[T]:
        """Queue ``fn``; the future resolves once its transaction committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, future, loop))
        return future

    def stop(self) -> None:
        """Ask the thread to finish the jobs queued so far, then close."""
        self._queue.put(None)

    def join(self) -> None:
        """Wait for the thread to end (blocking: call it from a worker thread)."""
        self._thread.join()

    def _run(self) -> None:
        try:
            stopping = False
            busy = False
            while not stopping:
                first = self._queue.get()
                if first is None:
                    break
                if busy and self._linger > 0:
                    time.sleep(self._linger)
                batch: list[_Job[Any]] = [first]
                while len(batch) < self._batch_size:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    batch.append(nxt)
                busy = len(batch) > 1
                self._commit(batch)
        finally:
            self._conn.close()

    def _commit(self, batch: list[_Job[Any]]) -> None:
        conn = self._conn
        outcomes: list[_Outcome] | None = None
        try:
            outcomes = self._all_or_nothing(batch)
            if outcomes is None:
                outcomes = self._one_by_one(batch)
            conn.execute("COMMIT")
            self.commits += 1
            self.jobs += len(batch)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            log.error("ledger commit of %d writes failed: %s", len(batch), exc,
                      extra=event(LEDGER_COMMIT_FAILED, error=str(exc), jobs=len(batch)))
            failure = sqlite_error(exc, f"cannot commit to ledger {self._path}")
            outcomes = [(job.future, None, failure) for job in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for job, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append(outcome)
        for loop, items in by_loop.items():
            # One wake-up of the loop per batch, not one per caller.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, items)

    def _all_or_nothing(self, batch: list[_Job[Any]]) -> list[_Outcome] | None:
        """Every job in one transaction, left open; None (rolled back) if one raised."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[_Outcome] = []
        try:
            for job in batch:
                outcomes.append((job.future, job.fn(conn), None))
        except Exception:
            if conn.in_transaction:  # SQLite rolls back by itself on some errors
                conn.execute("ROLLBACK")
            return None
        return outcomes

    def _one_by_one(self, batch: list[_Job[Any]]) -> list[_Outcome]:
        """Every job in its own savepoint of one transaction, left open."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[_Outcome] = []
        for job in batch:
            conn.execute("SAVEPOINT job")
            try:
                result = job.fn(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                if isinstance(exc, sqlite3.Error):
                    wrapped = sqlite_error(exc, f"cannot write ledger {self._path}")
                    wrapped.__cause__ = exc
                    exc = wrapped
                outcomes.append((job.future, None, exc))
            else:
                conn.execute("RELEASE job")
                outcomes.append((job.future, result, None))
        return outcomes

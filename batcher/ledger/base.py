"""The one interface every ledger backend implements.

The ledger is the truth: every step of every row is committed here, in order,
before the runner acts on it, so an export can be made at any moment and a
killed run resumes from it. SQLite, PostgreSQL and the in-memory backend all
pass the same contract tests (tests/test_ledger_contract.py). The row
vocabulary lives in :mod:`batcher.model`.

Two kinds of ledger, told apart by their ``shared`` attribute:

* a **private** ledger (``shared`` False: SQLite, ``MemoryLedger()``) belongs
  to one run at a time; SQLite enforces that with a lock file. It is a
  :class:`Ledger`.
* a **shared** ledger (``shared`` True: PostgreSQL, ``MemoryLedger(shared=True)``)
  is one job for several runners on several hosts. It is a
  :class:`LeasingLedger`: rows are leased to workers, so no two hosts work
  on one row at once, and the job's rate is kept by one shared pace.
  :func:`is_shared` tells the type checker so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from batcher.errors import LedgerError
from batcher.ledger.webhook_events import WebhookLedger
from batcher.model import Event, LedgerRow, NewRow, RunInfo, Stage, Update, UploadPart

__all__ = [
    "LEASE_TAKEN_OVER",
    "LeasingLedger",
    "Ledger",
    "NextMove",
    "PaceClaim",
    "is_shared",
]


class Ledger(WebhookLedger, Protocol):
    """What the runner needs from a ledger; implemented per backend.

    All methods are coroutines on the asyncio event loop. Writes resolve only
    once committed (group commit may batch many writers into one transaction).
    """

    description: str
    # True when several runners may share this ledger: then it is a LeasingLedger.
    shared: bool

    async def open(self, run: RunInfo, *, lock: bool = True) -> None:
        """Create or migrate the schema, take the run lock, record the run.

        Raises LedgerLocked when another live run holds the ledger.
        With ``lock=False`` (status, export) the ledger is only read.
        """
        ...

    async def close(self, exit_code: int | None = None) -> None:
        """Flush pending writes, record the run's end, release the lock."""
        ...

    async def import_rows(self, rows: Sequence[NewRow]) -> list[LedgerRow]:
        """Insert rows not yet present; return every given row's current state.

        Idempotent: importing the same rows again changes nothing but their
        ``retired`` flag. A row whose ``error`` is set and which is not yet
        active is stored (or refreshed) as FAILED with that error. A row whose
        group already has an earlier row gets ``leader_row_id`` = that row.
        A known row whose idempotency_key or source_sha256 changed is returned
        as stored; the runner decides what to do.
        """
        ...

    async def finish_import(self) -> int:
        """Mark rows not seen since :meth:`open` as retired; return how many."""
        ...

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
        """Compare-and-set a row from ``expect`` to ``to`` and append an event.

        What is compared:

        * with ``current``, the caller's copy of the row (the row it is
          moving): the row must be in one of ``expect`` *and* still at
          ``current.version``. Every write of a row raises its version, so a
          move from a stale copy conflicts, even one that keeps the stage
          (two hosts both replacing the project of a PROJECT row: one wins).
        * without ``current``, only the stage: whoever moves the row first
          wins and a later mover finds it elsewhere. A move that may keep the
          stage (``to`` in ``expect``) compares nothing it replaces, so it is
          refused without ``current`` (LedgerError).

        Raises TransitionConflict when the row is missing, not in ``expect``
        or at another version, and LedgerError when ``to`` is not a legal
        move. Each move raises the row's ``version`` by one.

        With ``current`` the ledger does not read the whole row back: it
        returns ``current`` with ``stage``, the update's columns and what the
        database computed (``attempts``, ``polls``, ``updated_at``,
        ``version``) replaced. Its ``row_id`` must be ``row_id``.

        ``then`` (with ``current`` only) is a second move from ``to``, made
        in the same write: an accepted generation whose answer already says
        it is finished costs one commit, not two. The row returned is the
        row after both; a backend may commit them one after the other (each
        is a state a resumed run knows how to go on from).
        """
        ...

    async def record_part(self, row_id: str, upload_id: str, part: UploadPart) -> None:
        """Keep a part the upload host confirmed, once committed.

        Kept only while the row is in PROJECT with ``upload_id`` as its
        ``upload_id``: anything else (a fresh project, a row moved on, another
        host's upload) raises TransitionConflict and records nothing. A part
        number recorded again replaces the earlier record.
        """
        ...

    async def upload_parts(self, row_id: str, upload_id: str) -> list[UploadPart]:
        """The parts recorded for the row's upload ``upload_id``, by number."""
        ...

    async def forget_parts(self, row_id: str) -> None:
        """Drop every part recorded for the row (its upload is confirmed)."""
        ...

    async def get(self, row_id: str) -> LedgerRow | None:
        """One row, or None."""
        ...

    async def group_rows(self, group: str) -> list[LedgerRow]:
        """The rows of one logical request (``group``) still in the job, by line."""
        ...

    def rows(
        self,
        *,
        stages: frozenset[Stage] | None = None,
        include_retired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        """Rows in manifest order (by line), streamed in pages."""
        ...

    async def counts(self, *, include_retired: bool = False) -> dict[Stage, int]:
        """How many rows are in each stage."""
        ...

    async def error_summary(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The most common (code, message, count) among failed rows."""
        ...

    async def events(self, row_id: str) -> list[Event]:
        """A row's history, oldest first."""
        ...

    async def runs(self) -> list[dict[str, Any]]:
        """Every run recorded in this ledger, oldest first."""
        ...


# The event a row's history gets when a worker takes over a lease that its
# previous owner let expire (detail: previousOwner, leaseExpiredAt, owner).
LEASE_TAKEN_OVER = "leaseTakenOver"


@dataclass(frozen=True, slots=True)
class NextMove:
    """A second move made together with a transition, from the stage it moved to."""

    to: Stage
    update: Update
    event: str
    detail: Mapping[str, Any] | None = None


async def move_then_move(
    ledger: Ledger,
    row_id: str,
    expect: Stage | frozenset[Stage],
    to: Stage,
    update: Update | None,
    *,
    event: str,
    detail: Mapping[str, Any] | None,
    current: LedgerRow | None,
    then: NextMove,
) -> LedgerRow:
    """A transition with ``then=`` made as two moves, one after the other.

    Each is a committed state a resumed run goes on from; for backends that
    cannot make both in one write (SQLite does).
    """
    if current is None:
        raise LedgerError(f"row {row_id}: a move with then= needs current=")
    first = await ledger.transition(row_id, expect, to, update, event=event,
                                    detail=detail, current=current)
    return await ledger.transition(row_id, to, then.to, then.update, event=then.event,
                                   detail=then.detail, current=first)


@dataclass(frozen=True, slots=True)
class PaceClaim:
    """Send slots the shared pace handed to one host, on the ledger's clock.

    The slots are at ``first_at + i * spacing`` for ``i`` in ``range(count)``;
    no other host holds a slot closer than ``spacing`` to any of them. A slot
    not used at its time is wasted, never given to anyone else.
    """

    first_at: float  # the first slot (ledger time, unix seconds)
    spacing: float  # seconds between consecutive slots of the whole job
    count: int  # slots in this block (0: the claim only reported or asked)
    now: float  # the ledger's time when the claim was made
    rate: float  # requests/s in force now: the job's rate, or less after a 429
    max_rate: float  # the job's configured rate (the ceiling of ``rate``)
    paused_until: float  # ledger time before which nobody may send (after a 429)


class LeasingLedger(Ledger, Protocol):
    """A ledger several runners can share: work is leased, workers heartbeat,
    and every host draws its requests' send times from one pace.

    A lease says which worker is working on a row and until when; heartbeats
    renew it. When a worker dies its leases run out and any other worker's
    :meth:`lease` takes those rows over. Leasing never changes a row's stage
    and never bypasses the compare-and-set of :meth:`Ledger.transition`:
    two workers that both believe they hold a row still cannot both move it.
    ``ttl`` is in seconds.

    Time is the ledger's own (PostgreSQL: the database server's clock), never
    the caller's ``wall``: a host whose clock is off, or that was paused,
    cannot make a lease look fresh or stale. A lease that ran out is gone,
    whether or not another worker took the row yet: neither a heartbeat nor
    :meth:`hold` revives it (the worker may :meth:`lease` the row again).

    The pace (:meth:`claim_slots`) keeps the job's requests under one rate
    across all hosts; :class:`batcher.ratelimit_shared.SharedRateGate` is the
    rate gate built on it.

    Implemented by the shared ledgers (``shared`` is True): PostgreSQL, where
    hosts share a job, and ``MemoryLedger(shared=True)``, where runners in one
    process do (in tests). A private ledger has no leases: one run owns it.
    """

    async def register_worker(self, worker_id: str, run: RunInfo, ttl: float) -> None:
        """Record a live worker (host and pid from ``run``) with a first heartbeat.

        Registering an id again refreshes it and keeps its leases.
        """
        ...

    async def heartbeat(self, worker_id: str, ttl: float) -> int:
        """Renew the worker and every unexpired lease it holds until now + ``ttl``.

        Returns how many workers are live (their last heartbeat is younger
        than the ttl they declared), this one included: the runner divides
        the job's ``--rate`` by it. Raises LedgerError for an unknown worker.
        """
        ...

    async def lease(self, worker_id: str, limit: int, ttl: float) -> list[LedgerRow]:
        """Lease up to ``limit`` rows to the worker until now + ``ttl``.

        Candidates are rows in ACTIVE_STAGES, not retired, not followers
        (``leader_row_id`` is None), and unleased or with an expired lease;
        they are taken in manifest order. Concurrent callers never get the
        same row. A row taken from another worker whose lease expired gets a
        :data:`LEASE_TAKEN_OVER` event naming that worker.
        """
        ...

    async def hold(self, worker_id: str, row_id: str, ttl: float) -> bool:
        """Whether the worker still holds an unexpired lease on the row; renew it if so.

        Atomic and cheap (one statement): call it right before a request
        that may cost money. True: the lease now lasts until now + ``ttl``
        and no other worker can take the row before then. False: the lease
        expired or another worker took the row over (a host that was paused
        longer than its ttl); the row is someone else's now, so drop it
        without sending anything. Unknown rows and workers give False.
        """
        ...

    async def claim_slots(self, count: int, *, lead: float, margin: float,
                          rate: float | None = None, pause: float | None = None) -> PaceClaim:
        """Claim the next ``count`` send slots of the job's shared pace, atomically.

        All hosts of a job draw their requests' send times from one schedule
        kept in the ledger, on the ledger's clock: consecutive slots are
        ``(1 + margin) / rate`` seconds apart (``rate`` rounded down to a
        whole number when it is 1 or more), so no window of one second ever
        holds more than ``rate`` slots of the whole job, however many hosts
        share it. The block starts at the end of the schedule, but no sooner
        than ``lead`` seconds from now (time for the answer to reach the
        host) nor before a 429 pause ends.

        ``rate``: the job's rate (the ceiling), set as RateGate.set_rate sets
        one: a lower one holds from this claim on, a higher one at once
        unless the pace is recovering from a 429. It must be given at least
        once before slots can be claimed (LedgerError otherwise).

        ``pause``: a 429 seen by this host: nobody gets a slot for ``pause``
        seconds from now, and the rate is halved (not below
        ``max(rate/50, min(1, rate))``, at most once per second and not again
        before the previous pause ended); after the pause it grows back by
        a twentieth of the ceiling per second.
        """
        ...

    async def release(self, worker_id: str, row_ids: Sequence[str]) -> None:
        """Give back the worker's leases on ``row_ids`` (others' are left alone)."""
        ...

    async def deregister_worker(self, worker_id: str) -> None:
        """Release every lease of the worker and forget it (unknown ids: no-op)."""
        ...

    async def live_workers(self) -> list[dict[str, Any]]:
        """Live workers, oldest first: worker_id, host, pid, run_id,
        started_at, heartbeat_at, ttl and ``leases`` (unexpired leases held)."""
        ...

    async def pending_work(self) -> tuple[int, int]:
        """(rows :meth:`lease` could hand out now, rows under an unexpired lease).

        Both count the candidates of :meth:`lease` only. (0, n>0): nothing
        left for a new worker but others are still busy; (0, 0): the job is
        done as far as leasing goes.
        """
        ...


def is_shared(ledger: Ledger) -> TypeGuard[LeasingLedger]:
    """Whether ``ledger`` is shared, and so a :class:`LeasingLedger`."""
    return ledger.shared

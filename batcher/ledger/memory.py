"""An in-memory ledger: the durable ledgers' semantics in dicts, for fast tests.

It passes the same contract suite as the durable backends
(tests/test_ledger_contract.py) and holds nothing on disk. Every method starts
with an anyio checkpoint, then runs without awaiting, so concurrent callers
interleave the way they do against a real ledger yet each call is atomic.
Unlike the SQLite ledger it may be opened again after :meth:`close`, with its
rows kept: that is how a runner test rehearses a resume.

``MemoryLedger()`` is private to one run, as a SQLite ledger is.
``MemoryLedger(shared=True)`` is shared as a PostgreSQL ledger is: it leases
rows to workers (:class:`~batcher.ledger.base.LeasingLedger`), and
:meth:`MemoryLedger.connect` gives another handle on the same rows, which a
second runner opens with its own run, as a second host connects to the same
database. Lease expiry and heartbeats read the clock of the store, the
``wall`` of the ledger that created it, whatever ``wall`` a handle was given:
that is the shared ledger's equivalent of the database's clock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio.lowlevel
import orjson

from batcher.errors import LedgerError, TransitionConflict
from batcher.ledger.base import LEASE_TAKEN_OVER, NextMove, PaceClaim
from batcher.ledger.codec import (
    REQUEST_FIELDS,
    inserted_record,
    json_copy,
    moved,
    new_row_values,
    row_from_record,
)
from batcher.ledger.memory_webhooks import EventStore, MemoryWebhookEvents
from batcher.ledger.rules import (
    PaceState,
    Refresh,
    claim_slots,
    first_earlier,
    holds_request,
    import_refresh,
    may_lead,
    plan_move,
    refusal,
)
from batcher.model import ACTIVE_STAGES, LedgerRow, NewRow, RunInfo, Stage, Update, UploadPart
from batcher.model import Event as LedgerEvent

__all__ = ["MemoryLedger"]


@dataclass(eq=False)
class _Store:
    """What a database would hold; every handle of a shared ledger holds the same one."""

    clock: Callable[[], float]  # the store's own time: leases and heartbeats
    rows: dict[str, LedgerRow] = field(default_factory=dict)
    # row_id -> the highest import epoch that saw it (every run that opens
    # for writing takes the next epoch, as on PostgreSQL)
    seen: dict[str, int] = field(default_factory=dict)
    groups: dict[str, set[str]] = field(default_factory=dict)
    events: dict[str, list[LedgerEvent]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # row -> (owner, expires)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    epoch: int = 0
    pace: PaceState = field(default_factory=PaceState)
    # (row_id, upload_id) -> part number -> the part
    parts: dict[tuple[str, str], dict[int, UploadPart]] = field(default_factory=dict)
    webhooks: EventStore = field(default_factory=EventStore)


class MemoryLedger(MemoryWebhookEvents):
    """A :class:`~batcher.ledger.base.Ledger` held in dicts.

    With ``shared=True`` it is also a :class:`~batcher.ledger.base.LeasingLedger`;
    otherwise its lease methods raise LedgerError, as a private ledger has
    none.
    """

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        page_size: int = 500,
        shared: bool = False,
    ) -> None:
        self.shared = shared
        self.description = "memory (shared)" if shared else "memory"
        self._wall = wall
        self._page_size = page_size
        self._db = _Store(clock=wall)
        self._run: RunInfo | None = None
        self._writable = False
        self._epoch = 0

    def __repr__(self) -> str:
        state = "closed" if self._run is None else ("open" if self._writable else "read-only")
        return f"<MemoryLedger {state} rows={len(self._db.rows)}{' shared' if self.shared else ''}>"

    def connect(self, *, wall: Callable[[], float] | None = None) -> MemoryLedger:
        """Another handle on this shared ledger's rows, for another runner.

        Open it with that runner's own run. ``wall`` stamps the rows and
        events it writes (this handle's ``wall`` by default); leases keep
        the store's clock.
        """
        if not self.shared:
            raise LedgerError("a private memory ledger has no other connections")
        other = MemoryLedger(wall=wall or self._wall, page_size=self._page_size, shared=True)
        other._db = self._db
        return other

    # -- lifecycle ---------------------------------------------------------

    async def open(self, run: RunInfo, *, lock: bool = True) -> None:
        """Start a run (``lock=True``) or a read-only session."""
        await anyio.lowlevel.checkpoint()
        if self._run is not None:
            raise LedgerError("memory ledger is already open")
        self._run = run
        self._writable = lock
        if lock:
            self._db.epoch += 1
            self._epoch = self._db.epoch
            self._db.runs.setdefault(
                run.run_id,
                {
                    "run_id": run.run_id,
                    "pid": run.pid,
                    "host": run.host,
                    "started_at": run.started_at,
                    "ended_at": None,
                    "exit_code": None,
                    "command": run.command,
                },
            )

    async def close(self, exit_code: int | None = None) -> None:
        """Record the run's end; safe to call twice."""
        await anyio.lowlevel.checkpoint()
        run, self._run = self._run, None
        if run is not None and self._writable:
            self._db.runs[run.run_id].update(ended_at=self._wall(), exit_code=exit_code)
        self._writable = False

    def _writer(self) -> RunInfo:
        if self._run is None:
            raise LedgerError("ledger is not open")
        if not self._writable:
            raise LedgerError("ledger is open read-only")
        return self._run

    def _reader(self) -> None:
        if self._run is None:
            raise LedgerError("ledger is not open")

    def _event_store(self) -> EventStore:
        return self._db.webhooks

    def _rows_by_id(self) -> Mapping[str, LedgerRow]:
        return self._db.rows

    # -- import ------------------------------------------------------------

    async def import_rows(self, rows: Sequence[NewRow]) -> list[LedgerRow]:
        """Insert new rows, mark all seen in this run; see the Protocol."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        return [self._import_one(new) for new in rows]

    def _import_one(self, new: NewRow) -> LedgerRow:
        now = self._wall()
        values = new_row_values(new)
        cur = self._db.rows.get(new.row_id)
        self._db.seen[new.row_id] = max(self._db.seen.get(new.row_id, 0), self._epoch)
        if cur is None:
            stage = Stage.FAILED if new.error is not None else Stage.PENDING
            row = self._fresh(values, stage, new, now)
            self._keep(row)
            detail: dict[str, Any] = {"line": new.line}
            if row.error is not None:
                detail["error"] = row.error
            self._event(row.row_id, now, None, stage, "imported", detail)
            return row
        row = replace(cur, line=new.line, retired=False)
        error = json_copy(new.error, "error")
        decision = import_refresh(row.stage, row.error, row.generation_id, error)
        if decision is Refresh.INVALIDATE:
            self._event(row.row_id, now, row.stage, Stage.FAILED, decision.value, error or {})
            row = replace(row, stage=Stage.FAILED, error=error, updated_at=now,
                          version=row.version + 1)
        elif decision is Refresh.REVALIDATE:
            fresh = self._fresh(values, Stage.PENDING, new, now)
            request = {name: getattr(fresh, name) for name in REQUEST_FIELDS}
            row = replace(row, stage=Stage.PENDING, error=None, updated_at=now,
                          version=row.version + 1, **request)
            self._event(row.row_id, now, Stage.FAILED, Stage.PENDING, decision.value, {})
        self._keep(row, previous=cur)
        return row

    def _fresh(
        self, values: dict[str, Any], stage: Stage, new: NewRow, now: float
    ) -> LedgerRow:
        """The row a database would hold after inserting ``values``."""
        leader = self._leader(new)
        return row_from_record(inserted_record(values, stage, leader, now))

    def _leader(self, new: NewRow) -> str | None:
        """The row ``new`` follows (rules.first_earlier), as find_leader picks it."""
        if new.group is None:
            return None
        candidates = (
            (holds, r.line, r.row_id)
            for r in self._group(new.group)
            if (holds := may_lead(r) and holds_request(r))
            or self._db.seen.get(r.row_id, 0) >= self._epoch
        )
        return first_earlier(candidates, new.line, new.row_id)

    def _group(self, group: str) -> list[LedgerRow]:
        """The rows of ``group`` still in the job, by line (transitions may move
        a row to another group, so the index is a superset)."""
        rows = (self._db.rows[rid] for rid in self._db.groups.get(group, ()))
        return sorted((r for r in rows if r.group == group and not r.retired),
                      key=lambda r: (r.line, r.row_id))

    def _keep(self, row: LedgerRow, previous: LedgerRow | None = None) -> None:
        if previous is not None and previous.group is not None and previous.group != row.group:
            self._db.groups[previous.group].discard(row.row_id)
        if row.group is not None:
            self._db.groups.setdefault(row.group, set()).add(row.row_id)
        self._db.rows[row.row_id] = row

    def _event(
        self,
        row_id: str,
        at: float,
        from_stage: Stage | None,
        to_stage: Stage,
        event: str,
        detail: Mapping[str, Any],
    ) -> None:
        run_id = self._run.run_id if self._run else ""
        self._db.events.setdefault(row_id, []).append(
            LedgerEvent(row_id, at, from_stage, to_stage, event, detail, run_id)
        )

    async def finish_import(self) -> int:
        """Retire rows no import since this run opened has seen (see PostgresLedger)."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        retired = 0
        for rid, row in self._db.rows.items():
            if not row.retired and self._db.seen.get(rid, 0) < self._epoch:
                self._db.rows[rid] = replace(row, retired=True)
                retired += 1
        return retired

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

        With ``current`` the result is built from it as the SQL backends build
        it (see :meth:`Ledger.transition`), so tests on this ledger see what
        the runner sees on a real one.
        """
        if then is not None:
            # One after the other here (each a committed state a resumed run
            # goes on from); SQLite makes both in one write.
            if current is None:
                raise LedgerError(f"row {row_id}: a move with then= needs current=")
            first = await self.transition(row_id, expect, to, update, event=event,
                                          detail=detail, current=current)
            return await self.transition(row_id, to, then.to, then.update, event=then.event,
                                         detail=then.detail, current=first)
        await anyio.lowlevel.checkpoint()
        self._writer()
        move = plan_move(row_id, expect, to, update, detail, current)
        deltas = (move.values["attempts_delta"], move.values["polls_delta"])
        cur = self._db.rows.get(row_id)
        if cur is None:
            raise refusal(move, None)
        if cur.stage not in move.allowed or move.version not in (None, cur.version):
            raise refusal(move, cur.stage, cur.version)
        now = self._wall()
        computed = (now, cur.attempts + deltas[0], cur.polls + deltas[1], cur.version + 1)
        row = moved(cur, to, move.fields, computed)
        self._keep(row, previous=cur)
        self._event(row_id, now, cur.stage, to, event, orjson.loads(move.detail))
        return row if current is None else moved(current, to, move.fields, computed)

    # -- upload parts ------------------------------------------------------

    async def record_part(self, row_id: str, upload_id: str, part: UploadPart) -> None:
        """Keep a confirmed part of the row's current upload; see the Protocol."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        row = self._db.rows.get(row_id)
        if row is None or row.stage is not Stage.PROJECT_CREATED or row.upload_id != upload_id:
            raise TransitionConflict(row_id, f"project (upload {upload_id})",
                                     None if row is None else row.stage.value)
        self._db.parts.setdefault((row_id, upload_id), {})[part.number] = part

    async def upload_parts(self, row_id: str, upload_id: str) -> list[UploadPart]:
        """The recorded parts of one upload, by number."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        parts = self._db.parts.get((row_id, upload_id), {})
        return [parts[n] for n in sorted(parts)]

    async def forget_parts(self, row_id: str) -> None:
        """Drop the row's recorded parts."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        for key in [k for k in self._db.parts if k[0] == row_id]:
            del self._db.parts[key]

    # -- reads -------------------------------------------------------------

    async def get(self, row_id: str) -> LedgerRow | None:
        """One row, or None."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        return self._db.rows.get(row_id)

    async def group_rows(self, group: str) -> list[LedgerRow]:
        """The rows of one logical request still in the job, by line."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        return self._group(group)

    async def rows(
        self,
        *,
        stages: frozenset[Stage] | None = None,
        include_retired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        """Rows by (line, row_id), in pages after the last key seen."""
        after: tuple[int, str] | None = None
        while True:
            await anyio.lowlevel.checkpoint()
            self._reader()
            page = sorted(
                (
                    r
                    for r in self._db.rows.values()
                    if (stages is None or r.stage in stages)
                    and (include_retired or not r.retired)
                    and (after is None or (r.line, r.row_id) > after)
                ),
                key=lambda r: (r.line, r.row_id),
            )[: self._page_size]
            for row in page:
                yield row
            if len(page) < self._page_size:
                return
            after = (page[-1].line, page[-1].row_id)

    async def counts(self, *, include_retired: bool = False) -> dict[Stage, int]:
        """Rows per stage, every stage present (zero when empty)."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        counts = dict.fromkeys(Stage, 0)
        for row in self._db.rows.values():
            if include_retired or not row.retired:
                counts[row.stage] += 1
        return counts

    async def error_summary(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The most common (code, message, count) among failed, unretired rows."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        # By code, the smallest message as the example (as the SQL backends).
        tally: dict[str, int] = {}
        example: dict[str, str] = {}
        for row in self._db.rows.values():
            if row.stage is Stage.FAILED and not row.retired:
                err = row.error or {}
                code, message = str(err.get("code") or ""), str(err.get("message") or "")
                tally[code] = tally.get(code, 0) + 1
                example[code] = min(example.get(code, message), message)
        ranked = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0], example[kv[0]]))
        return [(code, example[code], n) for code, n in ranked[:limit]]

    async def events(self, row_id: str) -> list[LedgerEvent]:
        """A row's history, oldest first."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        return list(self._db.events.get(row_id, ()))

    async def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        ordered = sorted(self._db.runs.values(), key=lambda r: (r["started_at"], r["run_id"]))
        return [dict(r) for r in ordered]

    # -- leases (LeasingLedger) ----------------------------------------------

    def _hosts(self, *, write: bool) -> float:
        """Check that leases may be used now; the store's time."""
        if write:
            self._writer()
        else:
            self._reader()
        if not self.shared:
            raise LedgerError(f"{self.description} is private to one run: it has no leases")
        return self._db.clock()

    def _leasable(self, row: LedgerRow) -> bool:
        return row.stage in ACTIVE_STAGES and not row.retired and row.leader_row_id is None

    def _known_worker(self, worker_id: str) -> dict[str, Any]:
        worker = self._db.workers.get(worker_id)
        if worker is None:
            raise LedgerError(f"worker {worker_id} is not registered")
        return worker

    def _live(self, now: float) -> list[dict[str, Any]]:
        return [w for w in self._db.workers.values() if w["heartbeat_at"] + w["ttl"] >= now]

    async def register_worker(self, worker_id: str, run: RunInfo, ttl: float) -> None:
        """Record a live worker; see :class:`~batcher.ledger.base.LeasingLedger`."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        started = self._db.workers.get(worker_id, {}).get("started_at", now)
        self._db.workers[worker_id] = {
            "worker_id": worker_id,
            "host": run.host,
            "pid": run.pid,
            "run_id": run.run_id,
            "started_at": started,
            "heartbeat_at": now,
            "ttl": float(ttl),
        }

    async def heartbeat(self, worker_id: str, ttl: float) -> int:
        """Renew the worker and its leases; return the number of live workers."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        worker = self._known_worker(worker_id)
        worker.update(heartbeat_at=now, ttl=float(ttl))
        for rid, (owner, expires) in self._db.leases.items():
            if owner == worker_id and expires >= now:  # one that ran out is not revived
                self._db.leases[rid] = (owner, now + ttl)
        return len(self._live(now))

    async def lease(self, worker_id: str, limit: int, ttl: float) -> list[LedgerRow]:
        """Lease up to ``limit`` free rows in manifest order to the worker."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        self._known_worker(worker_id)
        free = sorted(
            (
                r
                for r in self._db.rows.values()
                if self._leasable(r)
                and (r.row_id not in self._db.leases or self._db.leases[r.row_id][1] < now)
            ),
            key=lambda r: (r.line, r.row_id),
        )[: max(limit, 0)]
        for row in free:
            previous = self._db.leases.get(row.row_id)
            self._db.leases[row.row_id] = (worker_id, now + ttl)
            if previous is not None and previous[0] != worker_id:
                detail = {
                    "previousOwner": previous[0],
                    "leaseExpiredAt": previous[1],
                    "owner": worker_id,
                }
                self._event(row.row_id, now, row.stage, row.stage, LEASE_TAKEN_OVER, detail)
        return free

    async def hold(self, worker_id: str, row_id: str, ttl: float) -> bool:
        """Renew the worker's unexpired lease on the row; False when it has none."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        lease = self._db.leases.get(row_id)
        if lease is None or lease[0] != worker_id or lease[1] < now:
            return False
        self._db.leases[row_id] = (worker_id, now + ttl)
        return True

    async def claim_slots(self, count: int, *, lead: float, margin: float,
                          rate: float | None = None, pause: float | None = None) -> PaceClaim:
        """Claim send slots of the shared pace; see :class:`~batcher.ledger.base.LeasingLedger`."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=True)
        self._db.pace, claim = claim_slots(
            self._db.pace, now, count=count, lead=lead, margin=margin, rate=rate, pause=pause
        )
        return claim

    async def release(self, worker_id: str, row_ids: Sequence[str]) -> None:
        """Give back the worker's leases on ``row_ids``."""
        await anyio.lowlevel.checkpoint()
        self._hosts(write=True)
        for rid in row_ids:
            held = self._db.leases.get(rid)
            if held is not None and held[0] == worker_id:
                del self._db.leases[rid]

    async def deregister_worker(self, worker_id: str) -> None:
        """Release the worker's leases and forget it."""
        await anyio.lowlevel.checkpoint()
        self._hosts(write=True)
        for rid in [rid for rid, (owner, _) in self._db.leases.items() if owner == worker_id]:
            del self._db.leases[rid]
        self._db.workers.pop(worker_id, None)

    async def live_workers(self) -> list[dict[str, Any]]:
        """Live workers, oldest first, with the number of leases each holds."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=False)
        out = []
        for w in sorted(self._live(now), key=lambda w: (w["started_at"], w["worker_id"])):
            held = sum(
                1
                for owner, exp in self._db.leases.values()
                if owner == w["worker_id"] and exp >= now
            )
            out.append({**w, "leases": held})
        return out

    async def pending_work(self) -> tuple[int, int]:
        """(rows free to lease, rows under an unexpired lease)."""
        await anyio.lowlevel.checkpoint()
        now = self._hosts(write=False)
        free = held = 0
        for row in self._db.rows.values():
            if not self._leasable(row):
                continue
            lease = self._db.leases.get(row.row_id)
            if lease is None or lease[1] < now:
                free += 1
            else:
                held += 1
        return free, held

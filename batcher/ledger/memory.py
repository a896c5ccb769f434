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

This module holds the lifecycle, the import and the transitions. What the
ledger holds, and the checks and row histories every part of it shares, are
in :mod:`batcher.ledger.memory_store`; the reads
(:mod:`batcher.ledger.memory_reads`), upload parts
(:mod:`batcher.ledger.memory_parts`), leases
(:mod:`batcher.ledger.memory_leases`) and webhook events
(:mod:`batcher.ledger.memory_webhooks`) are mixins of :class:`MemoryLedger`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import anyio.lowlevel
import orjson

from batcher.errors import LedgerError
from batcher.ledger.base import NextMove, move_then_move
from batcher.ledger.codec import (
    REQUEST_FIELDS,
    inserted_record,
    json_copy,
    moved,
    new_row_values,
    row_from_record,
)
from batcher.ledger.memory_leases import MemoryLeases
from batcher.ledger.memory_parts import MemoryUploadParts
from batcher.ledger.memory_reads import MemoryReads
from batcher.ledger.memory_store import MemoryStore
from batcher.ledger.memory_webhooks import MemoryWebhookEvents
from batcher.ledger.rules import (
    Refresh,
    first_earlier,
    holds_request,
    import_refresh,
    may_lead,
    plan_move,
    refusal,
)
from batcher.model import LedgerRow, NewRow, RunInfo, Stage, Update

__all__ = ["MemoryLedger"]


class MemoryLedger(MemoryReads, MemoryUploadParts, MemoryLeases, MemoryWebhookEvents):
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
        self._db = MemoryStore(clock=wall)
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

    def _keep(self, row: LedgerRow, previous: LedgerRow | None = None) -> None:
        if previous is not None and previous.group is not None and previous.group != row.group:
            self._db.groups[previous.group].discard(row.row_id)
        if row.group is not None:
            self._db.groups.setdefault(row.group, set()).add(row.row_id)
        self._db.rows[row.row_id] = row

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
            return await move_then_move(self, row_id, expect, to, update, event=event,
                                        detail=detail, current=current, then=then)
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

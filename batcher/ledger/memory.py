"""An in-memory ledger: the SQLite ledger's semantics in dicts, for fast tests.

It passes the same contract suite as the durable backends
(tests/test_ledger_contract.py) and holds nothing on disk. Every method starts
with an anyio checkpoint, then runs without awaiting, so concurrent callers
interleave the way they do against a real ledger yet each call is atomic.
Unlike the SQLite ledger it may be opened again after :meth:`close`, with its
rows kept: that is how a runner test rehearses a resume.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import anyio.lowlevel
import orjson

from batcher.errors import LedgerError, TransitionConflict
from batcher.ledger.base import LEASE_TAKEN_OVER
from batcher.model import (
    ACTIVE_STAGES,
    UPDATE_COLUMNS,
    LedgerRow,
    NewRow,
    RunInfo,
    Stage,
    Update,
    describe_stages,
    legal_sources,
    stage_set,
)
from batcher.model import Event as LedgerEvent

__all__ = ["MemoryLedger"]

_DELTAS = frozenset({"attempts_delta", "polls_delta"})
_INVALID_ROW = "invalidRow"


def _json_copy(value: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    """A JSON round trip, so memory stores exactly what SQLite would."""
    if value is None:
        return None
    try:
        copied = orjson.loads(orjson.dumps(value))
    except TypeError as exc:
        raise LedgerError(f"{what} is not JSON-serializable: {exc}") from exc
    if not isinstance(copied, dict):
        raise LedgerError(f"{what} must be a JSON object")
    return copied


class MemoryLedger:
    """A :class:`~batcher.ledger.base.Ledger` held in dicts.

    ``shared=True`` makes it a ledger several runners share, as several hosts
    share a PostgreSQL one: they lease its rows (in-process tests of hosts).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        page_size: int = 500,
        shared: bool = False,
    ) -> None:
        self.description = "memory"
        self.shared = shared
        self._clock = clock
        self._page_size = page_size
        self._rows: dict[str, LedgerRow] = {}
        self._seen: dict[str, str] = {}  # row_id -> run_id of the last import that saw it
        self._groups: dict[str, set[str]] = {}
        self._events: dict[str, list[LedgerEvent]] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # row_id -> (owner, expires)
        self._workers: dict[str, dict[str, Any]] = {}
        self._run: RunInfo | None = None
        self._writable = False

    def __repr__(self) -> str:
        state = "closed" if self._run is None else ("open" if self._writable else "read-only")
        return f"<MemoryLedger {state} rows={len(self._rows)}>"

    # -- lifecycle ---------------------------------------------------------

    async def open(self, run: RunInfo, *, lock: bool = True) -> None:
        """Start a run (``lock=True``) or a read-only session."""
        await anyio.lowlevel.checkpoint()
        if self._run is not None:
            raise LedgerError("memory ledger is already open")
        self._run = run
        self._writable = lock
        if lock:
            self._runs.setdefault(
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
            self._runs[run.run_id].update(ended_at=self._clock(), exit_code=exit_code)
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

    # -- import ------------------------------------------------------------

    async def import_rows(self, rows: Sequence[NewRow]) -> list[LedgerRow]:
        """Insert new rows, mark all seen in this run; see the Protocol."""
        await anyio.lowlevel.checkpoint()
        run = self._writer()
        out: list[LedgerRow] = []
        for new in rows:
            out.append(self._import_one(new, run.run_id))
        return out

    def _import_one(self, new: NewRow, run_id: str) -> LedgerRow:
        now = self._clock()
        error = _json_copy(new.error, "error")
        cur = self._rows.get(new.row_id)
        self._seen[new.row_id] = run_id
        if cur is None:
            stage = Stage.FAILED if error is not None else Stage.PENDING
            row = LedgerRow(
                row_id=new.row_id,
                line=new.line,
                stage=stage,
                error=error,
                created_at=now,
                updated_at=now,
                **self._request_fields(new, run_id),
            )
            self._store(row)
            detail: dict[str, Any] = {"line": new.line}
            if error is not None:
                detail["error"] = error
            self._event(row.row_id, now, None, stage, "imported", detail)
            return row
        row = replace(cur, line=new.line, retired=False)
        if error is not None:
            if row.stage is Stage.PENDING or (row.stage is Stage.FAILED and row.error != error):
                self._event(row.row_id, now, row.stage, Stage.FAILED, "invalid", error)
                row = replace(row, stage=Stage.FAILED, error=error, updated_at=now)
        elif (
            row.stage is Stage.FAILED
            and row.error is not None
            and row.error.get("code") == _INVALID_ROW
            and row.generation_id is None
        ):
            row = replace(row, stage=Stage.PENDING, error=None, updated_at=now,
                          **self._request_fields(new, run_id))
            self._event(row.row_id, now, Stage.FAILED, Stage.PENDING, "revalidated", {})
        self._store(row, previous=cur)
        return row

    def _request_fields(self, new: NewRow, run_id: str) -> dict[str, Any]:
        """What a manifest row says about its request, as LedgerRow fields."""
        return {
            "kind": new.kind,
            "idempotency_key": new.idempotency_key,
            "model_key": new.model_key,
            "api_project_id": new.api_project_id,
            "sampling": _json_copy(new.sampling, "sampling") or {},
            "params": _json_copy(new.params, "params") or {},
            "source_path": new.source_path,
            "source_sha256": new.source_sha256,
            "source_size": new.source_size,
            "output_rel": new.output_rel,
            "explicit_key": new.explicit_key,
            "request_digest": new.request_digest,
            "group": new.group,
            "leader_row_id": self._leader(new, run_id),
        }

    def _leader(self, new: NewRow, run_id: str) -> str | None:
        if new.group is None:
            return None
        best: LedgerRow | None = None
        for rid in self._groups.get(new.group, ()):
            r = self._rows[rid]
            if (
                rid == new.row_id
                or r.retired
                or self._seen.get(rid) != run_id
                or r.line >= new.line
            ):
                continue
            if best is None or (r.line, r.row_id) < (best.line, best.row_id):
                best = r
        return best.row_id if best else None

    def _store(self, row: LedgerRow, previous: LedgerRow | None = None) -> None:
        if previous is not None and previous.group is not None and previous.group != row.group:
            self._groups[previous.group].discard(row.row_id)
        if row.group is not None:
            self._groups.setdefault(row.group, set()).add(row.row_id)
        self._rows[row.row_id] = row

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
        self._events.setdefault(row_id, []).append(
            LedgerEvent(row_id, at, from_stage, to_stage, event, detail, run_id)
        )

    async def finish_import(self) -> int:
        """Retire rows the current run's import did not see."""
        await anyio.lowlevel.checkpoint()
        run = self._writer()
        retired = 0
        for rid, row in self._rows.items():
            if not row.retired and self._seen.get(rid) != run.run_id:
                self._rows[rid] = replace(row, retired=True)
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
    ) -> LedgerRow:
        """Compare-and-set ``row_id`` from ``expect`` to ``to``; see the Protocol.

        With ``current`` the result is built from it as the SQL backends build
        it (see :meth:`Ledger.transition`), so tests on this ledger see what
        the runner sees on a real one.
        """
        await anyio.lowlevel.checkpoint()
        self._writer()
        changes: dict[str, Any] = dict(update or {})
        unknown = set(changes) - UPDATE_COLUMNS - _DELTAS
        if unknown:
            raise LedgerError(f"unknown update fields: {sorted(unknown)}")
        expected = stage_set(expect)
        allowed = legal_sources(expected, to)
        if not allowed:
            raise LedgerError(f"row {row_id}: illegal move {describe_stages(expected)} -> {to}")
        if current is not None and current.row_id != row_id:
            raise LedgerError(f"row {row_id}: current is row {current.row_id}")
        detail_copy = _json_copy(detail or {}, "event detail") or {}
        if "error" in changes:
            changes["error"] = _json_copy(changes["error"], "error")
        cur = self._rows.get(row_id)
        if cur is None or cur.stage not in expected:
            raise TransitionConflict(
                row_id, describe_stages(expected), cur.stage.value if cur else None
            )
        if cur.stage not in allowed:
            raise LedgerError(f"row {row_id}: illegal move {cur.stage} -> {to}")
        now = self._clock()
        attempts = cur.attempts + changes.pop("attempts_delta", 0)
        polls = cur.polls + changes.pop("polls_delta", 0)
        row = replace(cur, stage=to, attempts=attempts, polls=polls, updated_at=now, **changes)
        self._rows[row_id] = row
        self._event(row_id, now, cur.stage, to, event, detail_copy)
        if current is None:
            return row
        return replace(current, stage=to, attempts=attempts, polls=polls, updated_at=now, **changes)

    # -- reads -------------------------------------------------------------

    async def get(self, row_id: str) -> LedgerRow | None:
        """One row, or None."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        return self._rows.get(row_id)

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
                    for r in self._rows.values()
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
        for row in self._rows.values():
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
        for row in self._rows.values():
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
        return list(self._events.get(row_id, ()))

    async def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        ordered = sorted(self._runs.values(), key=lambda r: (r["started_at"], r["run_id"]))
        return [dict(r) for r in ordered]

    # -- leases (LeasingLedger) ----------------------------------------------

    def _leasable(self, row: LedgerRow) -> bool:
        return row.stage in ACTIVE_STAGES and not row.retired and row.leader_row_id is None

    def _known_worker(self, worker_id: str) -> dict[str, Any]:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise LedgerError(f"worker {worker_id} is not registered")
        return worker

    def _live(self, now: float) -> list[dict[str, Any]]:
        return [w for w in self._workers.values() if w["heartbeat_at"] + w["ttl"] >= now]

    async def register_worker(self, worker_id: str, run: RunInfo, ttl: float) -> None:
        """Record a live worker; see :class:`~batcher.ledger.base.LeasingLedger`."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        now = self._clock()
        started = self._workers.get(worker_id, {}).get("started_at", now)
        self._workers[worker_id] = {
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
        self._writer()
        worker = self._known_worker(worker_id)
        now = self._clock()
        worker.update(heartbeat_at=now, ttl=float(ttl))
        for rid, (owner, _) in self._leases.items():
            if owner == worker_id:
                self._leases[rid] = (owner, now + ttl)
        return len(self._live(now))

    async def lease(self, worker_id: str, limit: int, ttl: float) -> list[LedgerRow]:
        """Lease up to ``limit`` free rows in manifest order to the worker."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        self._known_worker(worker_id)
        now = self._clock()
        free = sorted(
            (
                r
                for r in self._rows.values()
                if self._leasable(r)
                and (r.row_id not in self._leases or self._leases[r.row_id][1] < now)
            ),
            key=lambda r: (r.line, r.row_id),
        )[: max(limit, 0)]
        for row in free:
            previous = self._leases.get(row.row_id)
            self._leases[row.row_id] = (worker_id, now + ttl)
            if previous is not None and previous[0] != worker_id:
                detail = {
                    "previousOwner": previous[0],
                    "leaseExpiredAt": previous[1],
                    "owner": worker_id,
                }
                self._event(row.row_id, now, row.stage, row.stage, LEASE_TAKEN_OVER, detail)
        return free

    async def release(self, worker_id: str, row_ids: Sequence[str]) -> None:
        """Give back the worker's leases on ``row_ids``."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        for rid in row_ids:
            held = self._leases.get(rid)
            if held is not None and held[0] == worker_id:
                del self._leases[rid]

    async def deregister_worker(self, worker_id: str) -> None:
        """Release the worker's leases and forget it."""
        await anyio.lowlevel.checkpoint()
        self._writer()
        for rid in [rid for rid, (owner, _) in self._leases.items() if owner == worker_id]:
            del self._leases[rid]
        self._workers.pop(worker_id, None)

    async def live_workers(self) -> list[dict[str, Any]]:
        """Live workers, oldest first, with the number of leases each holds."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        now = self._clock()
        out = []
        for w in sorted(self._live(now), key=lambda w: (w["started_at"], w["worker_id"])):
            held = sum(
                1 for owner, exp in self._leases.values() if owner == w["worker_id"] and exp >= now
            )
            out.append({**w, "leases": held})
        return out

    async def pending_work(self) -> tuple[int, int]:
        """(rows free to lease, rows under an unexpired lease)."""
        await anyio.lowlevel.checkpoint()
        self._reader()
        now = self._clock()
        free = held = 0
        for row in self._rows.values():
            if not self._leasable(row):
                continue
            lease = self._leases.get(row.row_id)
            if lease is None or lease[1] < now:
                free += 1
            else:
                held += 1
        return free, held

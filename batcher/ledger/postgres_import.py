"""One import batch on the PostgreSQL ledger, as a few set-wise statements.

Row by row (as on SQLite) would cost four round trips per row; here a batch
of hundreds costs about six, whatever its size:

1. lock the batch's rows that exist already, in row_id order (the order every
   multi-row statement of this ledger locks in, so hosts queue, not deadlock);
2. find each group's first row seen since this run opened, outside the batch;
3. insert the new rows (``ON CONFLICT DO NOTHING``: another host may have
   inserted some meanwhile; those are treated as known below);
4. record an ``imported`` event for each row this host inserted;
5. mark every known row seen by this run (its line follows the manifest);
6. row by row, only for the rare known row that turned invalid or valid again.

The caller runs it in one transaction and runs it again if it loses a
deadlock to a host importing the same rows in another order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import orjson

from batcher.ledger.codec import row_from_record
from batcher.ledger.postgres_sql import Query
from batcher.ledger.rules import Refresh, first_earlier, import_refresh
from batcher.model import LedgerRow, NewRow, Stage

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["BatchImport"]

Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
Record = asyncpg.Record

_INSERT_COLUMNS = (
    "row_id", "line", "kind", "stage", "idempotency_key", "model_key", "api_project_id",
    "sampling", "params", "source_path", "source_sha256", "source_size", "output_rel",
    "error", "error_code", "error_message", "explicit_key", "request_digest", "group_key",
    "leader_row_id",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BatchImport:
    """Imports batches for one run: its ``run_id`` and import ``epoch``."""

    queries: Mapping[str, Query]
    run_id: str
    epoch: int

    async def run(
        self, conn: Conn, prepared: list[tuple[NewRow, dict[str, Any]]], now: float
    ) -> list[LedgerRow]:
        """Import ``prepared`` (rows with their column values) inside ``conn``'s
        transaction; every given row's current state, in the given order."""
        q = self.queries
        base = {"run_id": self.run_id, "epoch": self.epoch, "now": now, "at": now}
        ids = list(dict.fromkeys(p["row_id"] for _, p in prepared))
        lock = q["lock_rows"]
        existing = {r["row_id"] for r in await conn.fetch(lock.text, *lock.args({"row_ids": ids}))}
        leaders = await self._leaders(conn, prepared, ids)
        inserted: dict[str, Record] = {}
        fresh: dict[str, tuple[NewRow, dict[str, Any]]] = {}
        for new, p in prepared:
            if p["row_id"] not in existing and p["row_id"] not in fresh:
                fresh[p["row_id"]] = (new, p)
        if fresh:
            columns: dict[str, list[Any]] = {c: [] for c in _INSERT_COLUMNS}
            for new, p in fresh.values():
                stage = Stage.FAILED if new.error is not None else Stage.PENDING
                values = {**p, "stage": stage.value, "leader_row_id": leaders.get(new.row_id)}
                for c in _INSERT_COLUMNS:
                    columns[c].append(values[c])
            ins = q["insert_rows"]
            for r in await conn.fetch(ins.text, *ins.args({**base, **columns})):
                inserted[r["row_id"]] = r
            events: dict[str, list[Any]] = {"row_ids": [], "to_stages": [], "details": []}
            for rid, r in inserted.items():
                new = fresh[rid][0]
                detail = {"line": new.line, **({"error": new.error} if new.error else {})}
                events["row_ids"].append(rid)
                events["to_stages"].append(r["stage"])
                events["details"].append(orjson.dumps(detail).decode())
            if inserted:
                ev = q["insert_import_events"]
                await conn.execute(ev.text, *ev.args({**base, **events}))
        marked: dict[str, Record] = {}
        others = [(p["row_id"], p["line"]) for _, p in prepared if p["row_id"] not in inserted]
        if others:
            ms = q["mark_seen_rows"]
            params = {**base, "row_ids": [o[0] for o in others], "lines": [o[1] for o in others]}
            for r in await conn.fetch(ms.text, *ms.args(params)):
                marked[r["row_id"]] = r
        out: list[LedgerRow] = []
        for new, p in prepared:
            rid = p["row_id"]
            if rid in inserted:
                out.append(row_from_record(inserted[rid]))
            else:
                out.append(await self._refresh(conn, new, p, marked[rid], leaders, now))
        return out

    async def _leaders(
        self,
        conn: Conn,
        prepared: list[tuple[NewRow, dict[str, Any]]],
        ids: list[str],
    ) -> dict[str, str]:
        """row_id -> the row it follows (rules.first_earlier), for rows that follow one.

        Candidates, as SQLite sees them importing row by row: a row that
        holds the group's request, and rows seen since this run's epoch
        (every host imports in line order, so earlier batches have been
        marked seen by this run already) and the rows before this one in the
        batch.
        """
        groups = sorted({p["group_key"] for _, p in prepared if p["group_key"] is not None})
        if not groups:
            return {}
        gl = self.queries["group_leaders"]
        params = {"groups": groups, "epoch": self.epoch, "row_ids": ids}
        seen: dict[str, list[tuple[bool, int, str]]] = {g: [] for g in groups}
        for r in await conn.fetch(gl.text, *gl.args(params)):
            seen[r["group_key"]].append((bool(r["holds"]), r["line"], r["row_id"]))
        leaders: dict[str, str] = {}
        for _, p in prepared:
            group = p["group_key"]
            if group is None:
                continue
            leader = first_earlier(seen[group], p["line"], p["row_id"])
            if leader is not None:
                leaders[p["row_id"]] = leader
            seen[group].append((False, p["line"], p["row_id"]))
        return leaders

    async def _refresh(
        self,
        conn: Conn,
        new: NewRow,
        params: dict[str, Any],
        row: Record,
        leaders: Mapping[str, str],
        now: float,
    ) -> LedgerRow:
        """A known row: fail it if it turned invalid, restart it if it came valid."""
        q = self.queries
        stored = row_from_record(row)
        fresh_error = None if params["error"] is None else orjson.loads(params["error"])
        decision = import_refresh(stored.stage, stored.error, stored.generation_id, fresh_error)
        if decision is Refresh.INVALIDATE:
            to, statement, detail = Stage.FAILED, q["mark_invalid"], params["error"]
        elif decision is Refresh.REVALIDATE:
            to, statement, detail = Stage.PENDING, q["revalidate_row"], "{}"
        else:
            return stored
        values = {**params, "now": now, "leader_row_id": leaders.get(new.row_id)}
        found = await conn.fetchrow(statement.text, *statement.args(values))
        if found is None:  # the statements re-check the stage (the row is locked: never)
            return stored
        await self._event(conn, new.row_id, now, stored.stage, to, decision.value, detail)
        return row_from_record(found)

    async def _event(
        self,
        conn: Conn,
        row_id: str,
        at: float,
        from_stage: Stage | None,
        to_stage: Stage,
        event: str,
        detail: str,
    ) -> None:
        q = self.queries["insert_event"]
        params = {
            "row_id": row_id,
            "at": at,
            "from_stage": from_stage.value if from_stage else None,
            "to_stage": to_stage.value,
            "event": event,
            "detail": detail,
            "run_id": self.run_id,
        }
        await conn.execute(q.text, *q.args(params))

"""The memory ledger's read-side methods: rows, counts, histories, runs.

Each gives what the SQL backends' queries give, in the same order, so tests
on a memory ledger see what a run sees on a durable one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio.lowlevel

from batcher.ledger.memory_store import MemoryHandle
from batcher.model import Event as LedgerEvent
from batcher.model import LedgerRow, Stage

__all__ = ["MemoryReads"]


class MemoryReads(MemoryHandle):
    """Mixed into :class:`~batcher.ledger.memory.MemoryLedger`."""

    _page_size: int

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

"""The PostgreSQL ledger's read-side methods: rows, counts, histories, runs.

Reads take a connection of the pool and need no transaction of their own;
:meth:`~PostgresReads.rows` pages by key, one query per page, so a long
export holds no snapshot open while the hosts write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from batcher.ledger import codec
from batcher.ledger.postgres_sql import PostgresPlumbing
from batcher.model import Event, LedgerRow, Stage

__all__ = ["PostgresReads"]

_ALL_STAGES: list[str] = sorted(s.value for s in Stage)
_FIRST_LINE = -(2**31)  # below every INTEGER line


class PostgresReads(PostgresPlumbing):
    """Mixed into :class:`~batcher.ledger.postgres.PostgresLedger`."""

    async def get(self, row_id: str) -> LedgerRow | None:
        """One row, or None."""
        pool = self._pool_for(write=False)
        with self._translate(f"read row {row_id}"):
            found = await pool.fetchrow(self._q["get_row"].text, row_id)
        return codec.row_from_record(found) if found is not None else None

    async def group_rows(self, group: str) -> list[LedgerRow]:
        """The rows of one logical request still in the job, by line."""
        pool = self._pool_for(write=False)
        q = self._q["group_rows"]
        with self._translate(f"read group {group}"):
            found = await pool.fetch(q.text, *q.args({"group_key": group}))
        return [codec.row_from_record(r) for r in found]

    async def rows(
        self,
        *,
        stages: frozenset[Stage] | None = None,
        include_retired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        """Rows by (line, row_id), one query per page (keyset pagination)."""
        wanted = sorted(s.value for s in stages) if stages is not None else _ALL_STAGES
        if not wanted:
            return
        q = self._q["rows_page"]
        after: tuple[int, str] = (_FIRST_LINE, "")
        while True:
            pool = self._pool_for(write=False)
            params = {
                "after_line": after[0],
                "after_row_id": after[1],
                "stages": wanted,
                "include_retired": include_retired,
                "limit": self._page_size,
            }
            with self._translate("read rows"):
                page = [codec.row_from_record(r) for r in await pool.fetch(q.text, *q.args(params))]
            for row in page:
                yield row
            if len(page) < self._page_size:
                return
            after = (page[-1].line, page[-1].row_id)

    async def counts(self, *, include_retired: bool = False) -> dict[Stage, int]:
        """Rows per stage, every stage present (zero when empty)."""
        pool = self._pool_for(write=False)
        with self._translate("count rows"):
            found = await pool.fetch(self._q["counts"].text, include_retired)
        counts = dict.fromkeys(Stage, 0)
        for stage, n in found:
            counts[codec.STAGES[stage]] = int(n)
        return counts

    async def error_summary(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The most common (code, message, count) among failed, unretired rows."""
        pool = self._pool_for(write=False)
        with self._translate("summarize errors"):
            found = await pool.fetch(self._q["error_summary"].text, limit)
        return [(str(code), str(message), int(n)) for code, message, n in found]

    async def events(self, row_id: str) -> list[Event]:
        """A row's history, oldest first."""
        pool = self._pool_for(write=False)
        with self._translate(f"read the events of row {row_id}"):
            found = await pool.fetch(self._q["events"].text, row_id)
        return [codec.event_from_columns(*record) for record in found]

    async def runs(self) -> list[dict[str, Any]]:
        """Every run recorded in this ledger, oldest first."""
        pool = self._pool_for(write=False)
        with self._translate("read runs"):
            return [dict(r) for r in await pool.fetch(self._q["runs"].text)]

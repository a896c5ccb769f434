"""The SQLite ledger's read-side methods: rows, counts, histories, runs.

Every read runs on the ledger's one read connection (``_read``), which WAL
lets read while the writer writes, in this process or in a run elsewhere.
Also here: the two cursor helpers the whole SQLite ledger uses.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from functools import cache
from typing import Any, TypeVar

from batcher.ledger import codec
from batcher.model import Event, LedgerRow, Stage

__all__ = ["SqliteReads", "records", "stage_params"]

T = TypeVar("T")

_ALL_STAGES: tuple[Stage, ...] = tuple(Stage)
_FIRST_KEY = (-(2**62), "")  # sorts before every (line, row_id)


@cache
def stage_params(stages: tuple[Stage, ...]) -> dict[str, str]:
    """:s0..:s6 for a stage list, padded with its first stage (see queries.sql)."""
    return {f"s{i}": (stages[i] if i < len(stages) else stages[0]).value for i in range(7)}


def records(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A cursor's rows as dicts. (sqlite3.Row looks names up one by one by a
    case-insensitive scan, which costs more than the UPDATE that made them.)"""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


class SqliteReads:
    """Mixed into :class:`~batcher.ledger.sqlite.SqliteLedger`."""

    _q: dict[str, str]
    _page_size: int

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def get(self, row_id: str) -> LedgerRow | None:
        """One row, or None."""

        def job(conn: sqlite3.Connection) -> LedgerRow | None:
            found = records(conn.execute(self._q["get_row"], {"row_id": row_id}))
            return codec.row_from_record(found[0]) if found else None

        return await self._read(job)

    async def group_rows(self, group: str) -> list[LedgerRow]:
        """The rows of one logical request still in the job, by line."""

        def job(conn: sqlite3.Connection) -> list[LedgerRow]:
            found = records(conn.execute(self._q["group_rows"], {"group_key": group}))
            return [codec.row_from_record(r) for r in found]

        return await self._read(job)

    async def rows(
        self,
        *,
        stages: frozenset[Stage] | None = None,
        include_retired: bool = False,
    ) -> AsyncIterator[LedgerRow]:
        """Rows by (line, row_id), one query per page (keyset pagination)."""
        wanted = tuple(sorted(stages)) if stages is not None else _ALL_STAGES
        if not wanted:
            return
        params: dict[str, Any] = {"include_retired": include_retired, "limit": self._page_size}
        params.update(stage_params(wanted))
        after = _FIRST_KEY
        while True:
            page_params = {**params, "after_line": after[0], "after_row_id": after[1]}

            def job(conn: sqlite3.Connection, p: dict[str, Any] = page_params) -> list[LedgerRow]:
                found = records(conn.execute(self._q["rows_page"], p))
                return [codec.row_from_record(r) for r in found]

            page = await self._read(job)
            for row in page:
                yield row
            if len(page) < self._page_size:
                return
            after = (page[-1].line, page[-1].row_id)

    async def counts(self, *, include_retired: bool = False) -> dict[Stage, int]:
        """Rows per stage, every stage present (zero when empty)."""

        def job(conn: sqlite3.Connection) -> dict[Stage, int]:
            counts = dict.fromkeys(Stage, 0)
            for stage, n in conn.execute(self._q["counts"], {"include_retired": include_retired}):
                counts[codec.STAGES[stage]] = n
            return counts

        return await self._read(job)

    async def error_summary(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The most common (code, message, count) among failed, unretired rows."""

        def job(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            found = conn.execute(self._q["error_summary"], {"limit": limit})
            return [(str(code), str(message), int(n)) for code, message, n in found]

        return await self._read(job)

    async def events(self, row_id: str) -> list[Event]:
        """A row's history, oldest first."""

        def job(conn: sqlite3.Connection) -> list[Event]:
            found = conn.execute(self._q["events"], {"row_id": row_id})
            return [codec.event_from_columns(*record) for record in found]

        return await self._read(job)

    async def runs(self) -> list[dict[str, Any]]:
        """Every run recorded in this ledger, oldest first."""
        return await self._read(lambda conn: records(conn.execute(self._q["runs"])))

"""The SQLite ledger's upload parts: the confirmed parts of a row's current upload.

A part is recorded only while its row is still in the project stage with
that upload (one statement decides it), so a resumed run skips exactly the
parts the upload host confirmed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from batcher.errors import TransitionConflict
from batcher.ledger import codec
from batcher.ledger.sqlite_reads import records
from batcher.model import UploadPart

__all__ = ["SqliteUploadParts"]

T = TypeVar("T")


class SqliteUploadParts:
    """Mixed into :class:`~batcher.ledger.sqlite.SqliteLedger`."""

    _q: dict[str, str]
    _wall: Callable[[], float]

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def record_part(self, row_id: str, upload_id: str, part: UploadPart) -> None:
        """Keep a confirmed part of the row's current upload; see the Protocol."""
        params = codec.part_values(row_id, upload_id, part, self._wall())

        def job(conn: sqlite3.Connection) -> None:
            if conn.execute(self._q["record_part"], params).rowcount == 1:
                return
            got = conn.execute(self._q["get_stage"], params).fetchone()
            raise TransitionConflict(row_id, f"project (upload {upload_id})",
                                     None if got is None else str(got[0]))

        await self._write(job)

    async def upload_parts(self, row_id: str, upload_id: str) -> list[UploadPart]:
        """The recorded parts of one upload, by number."""
        params = {"row_id": row_id, "upload_id": upload_id}

        def job(conn: sqlite3.Connection) -> list[UploadPart]:
            found = records(conn.execute(self._q["upload_parts"], params))
            return [codec.part_from_record(r) for r in found]

        return await self._read(job)

    async def forget_parts(self, row_id: str) -> None:
        """Drop the row's recorded parts."""
        params = {"row_id": row_id}
        await self._write(lambda conn: conn.execute(self._q["forget_parts"], params))

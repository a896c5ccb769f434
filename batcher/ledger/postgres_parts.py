"""The PostgreSQL ledger's upload parts: the confirmed parts of a row's current upload.

A part is recorded only while its row is still in the project stage with
that upload (one statement decides it), so a host that lost the row to
another records nothing.
"""

from __future__ import annotations

from batcher.errors import TransitionConflict
from batcher.ledger import codec
from batcher.ledger.postgres_sql import PostgresPlumbing
from batcher.model import UploadPart

__all__ = ["PostgresUploadParts"]


class PostgresUploadParts(PostgresPlumbing):
    """Mixed into :class:`~batcher.ledger.postgres.PostgresLedger`."""

    async def record_part(self, row_id: str, upload_id: str, part: UploadPart) -> None:
        """Keep a confirmed part of the row's current upload; see the Protocol."""
        params = codec.part_values(row_id, upload_id, part, self._wall())
        status = await self._exec("record_part", params, f"record a part of row {row_id}")
        if status.rsplit(" ", 1)[-1] != "0":
            return
        pool = self._pool_for(write=True)
        with self._translate(f"read row {row_id}"):
            got = await pool.fetchrow(self._q["get_stage"].text, row_id)
        raise TransitionConflict(row_id, f"project (upload {upload_id})",
                                 None if got is None else str(got["stage"]))

    async def upload_parts(self, row_id: str, upload_id: str) -> list[UploadPart]:
        """The recorded parts of one upload, by number."""
        pool = self._pool_for(write=False)
        q = self._q["upload_parts"]
        with self._translate(f"read the parts of row {row_id}"):
            found = await pool.fetch(q.text, *q.args({"row_id": row_id, "upload_id": upload_id}))
        return [codec.part_from_record(r) for r in found]

    async def forget_parts(self, row_id: str) -> None:
        """Drop the row's recorded parts."""
        await self._exec("forget_parts", {"row_id": row_id}, f"forget the parts of row {row_id}")

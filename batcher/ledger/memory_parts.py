"""The memory ledger's upload parts: the confirmed parts of a row's current upload.

As on the SQL backends, a part is kept only while its row is still in the
project stage with that upload.
"""

from __future__ import annotations

import anyio.lowlevel

from batcher.errors import TransitionConflict
from batcher.ledger.memory_store import MemoryHandle
from batcher.model import Stage, UploadPart

__all__ = ["MemoryUploadParts"]


class MemoryUploadParts(MemoryHandle):
    """Mixed into :class:`~batcher.ledger.memory.MemoryLedger`."""

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

"""What a memory ledger holds: the rows, events, runs, leases and parts a database would.

Every handle of a shared memory ledger holds the same store (see
:meth:`~batcher.ledger.memory.MemoryLedger.connect`), as every host holds a
connection to the same database.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batcher.errors import LedgerError
from batcher.ledger.rules import PaceState
from batcher.ledger.webhook_events import StoredEvent
from batcher.model import Event as LedgerEvent
from batcher.model import LedgerRow, RunInfo, Stage, UploadPart
from batcher.webhooks.events import GenerationEvent

__all__ = ["EventStore", "MemoryHandle", "MemoryStore"]


@dataclass(eq=False)
class EventStore:
    """The events part of a memory ledger's store."""

    kept: list[StoredEvent] = field(default_factory=list)
    message_ids: set[str] = field(default_factory=set)
    latest: dict[str, GenerationEvent] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class MemoryStore:
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


class MemoryHandle:
    """A handle on a :class:`MemoryStore`: what the memory ledger and its mixins share.

    The checks that a write or a read may happen now, the rows of a group,
    and a row's history, as :class:`~batcher.ledger.memory.MemoryLedger`
    keeps them.
    """

    _db: MemoryStore
    _run: RunInfo | None
    _writable: bool
    _wall: Callable[[], float]

    def _writer(self) -> RunInfo:
        if self._run is None:
            raise LedgerError("ledger is not open")
        if not self._writable:
            raise LedgerError("ledger is open read-only")
        return self._run

    def _reader(self) -> None:
        if self._run is None:
            raise LedgerError("ledger is not open")

    def _group(self, group: str) -> list[LedgerRow]:
        """The rows of ``group`` still in the job, by line (transitions may move
        a row to another group, so the index is a superset)."""
        rows = (self._db.rows[rid] for rid in self._db.groups.get(group, ()))
        return sorted((r for r in rows if r.group == group and not r.retired),
                      key=lambda r: (r.line, r.row_id))

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

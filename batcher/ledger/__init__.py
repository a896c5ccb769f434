"""The ledger: where every row's progress is committed, in order, before the
runner acts on it, so an export can be made at any moment and a killed run
resumes from it.

:func:`open_ledger` picks a backend from ``--ledger``'s value; the runner sees
the :class:`~batcher.ledger.base.Ledger` Protocol, and on a shared ledger
(PostgreSQL) the :class:`~batcher.ledger.base.LeasingLedger` one.

:class:`PostgresLedger` and :class:`MemoryLedger` are imported on first use
(``open_ledger`` with their URL, or the attribute itself): asyncpg takes
about 55 ms to import, which every SQLite run and every ``batcher status``
would pay, and a run on a file needs neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from batcher.errors import ConfigError
from batcher.ledger.base import Ledger
from batcher.ledger.sqlite import SqliteLedger

if TYPE_CHECKING:
    from batcher.ledger.memory import MemoryLedger
    from batcher.ledger.postgres import PostgresLedger

__all__ = ["MemoryLedger", "PostgresLedger", "SqliteLedger", "open_ledger"]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def __getattr__(name: str) -> object:
    """The lazy re-exports of :class:`PostgresLedger` and :class:`MemoryLedger` (PEP 562)."""
    if name == "PostgresLedger":
        from batcher.ledger.postgres import PostgresLedger

        return PostgresLedger
    if name == "MemoryLedger":
        from batcher.ledger.memory import MemoryLedger

        return MemoryLedger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_ledger(path_or_url: str, *, wall: Callable[[], float] = time.time) -> Ledger:
    """The ledger ``path_or_url`` names, not yet opened.

    ``:memory:`` gives a :class:`MemoryLedger`, ``postgresql://…`` (or
    ``postgres://…``) a :class:`PostgresLedger` shared by every host given the
    same URL (ConfigError, password redacted, for a malformed one), anything
    else a :class:`SqliteLedger` on that path (``sqlite:///path`` is accepted
    too). Only the PostgreSQL one is shared
    (:func:`~batcher.ledger.base.is_shared`).
    """
    if path_or_url == ":memory:":
        from batcher.ledger.memory import MemoryLedger

        return MemoryLedger(wall=wall)
    if path_or_url.startswith(_POSTGRES_SCHEMES):
        from batcher.ledger.postgres import PostgresLedger

        return PostgresLedger(path_or_url, wall=wall)
    if path_or_url.startswith("sqlite://"):
        path_or_url = path_or_url.removeprefix("sqlite://")
    if not path_or_url:
        raise ConfigError("--ledger needs a file path")
    return SqliteLedger(Path(path_or_url).expanduser(), wall=wall)

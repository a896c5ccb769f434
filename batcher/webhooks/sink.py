"""Where verified events go: the :class:`EventSink` protocol and a memory sink.

The receiver verifies, de-duplicates and parses; what an event *means* is
the sink's business. The ledger is the sink of a real run; :class:`MemorySink`
keeps events in memory for tests and for trying the receiver out.

What any sink must guarantee:

- An event is a fact about one generation. ``accept`` records it durably
  before it returns :attr:`Disposition.RECORDED`: the receiver answers 2xx
  only after that, and a 2xx tells the sender never to send it again.
- A stale event (one that does not supersede what is known, see
  :func:`batcher.webhooks.events.supersedes` / ``advances``) changes nothing
  and returns :attr:`Disposition.STALE`; it may be kept as history.
- A generation the sink does not know (the same API key's other jobs)
  returns :attr:`Disposition.UNKNOWN` and changes nothing.
- A message id it has already recorded returns :attr:`Disposition.DUPLICATE`
  (the receiver's own memory of ids is bounded and per process; a ledger's is
  durable and shared by hosts).
- Trouble of its own (database down, timeout) is raised, not answered: the
  receiver then answers 503 and the sender delivers again later.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from enum import StrEnum
from typing import Protocol, runtime_checkable

from batcher.webhooks.events import GenerationEvent, supersedes

__all__ = ["Disposition", "EventSink", "MemorySink"]


class Disposition(StrEnum):
    """What a sink did with an event; every one of them is answered 2xx."""

    # Recorded durably, and it is the newest news of its generation.
    RECORDED = "recorded"
    # Older than what is known of its generation: changes nothing.
    STALE = "stale"
    # Not a generation of this ledger: ignored.
    UNKNOWN = "unknown"
    # This message id was recorded before.
    DUPLICATE = "duplicate"


@runtime_checkable
class EventSink(Protocol):
    """Takes verified events; a ledger implements it (see the module's rules)."""

    async def accept(self, event: GenerationEvent, message_id: str) -> Disposition:
        """Record ``event`` (delivered as ``message_id``) unless stale, unknown or seen."""
        ...


class MemorySink:
    """An :class:`EventSink` in memory: the newest event of each generation.

    ``known`` says which generations are "in this ledger": a collection of
    generation ids, a predicate, or None for all. Staleness follows
    :func:`supersedes`; message ids are remembered for the sink's lifetime.
    """

    def __init__(self, known: Collection[str] | Callable[[str], bool] | None = None) -> None:
        if known is None:
            self._known: Callable[[str], bool] = lambda _gen: True
        elif callable(known):
            self._known = known
        else:
            ids = frozenset(known)
            self._known = ids.__contains__
        #: generation id -> the newest event recorded
        self.latest: dict[str, GenerationEvent] = {}
        #: every event that was recorded as news, in order: (message id, event)
        self.recorded: list[tuple[str, GenerationEvent]] = []
        #: every call's outcome, in order: (message id, disposition)
        self.outcomes: list[tuple[str, Disposition]] = []
        self._message_ids: set[str] = set()

    def __repr__(self) -> str:
        return f"MemorySink(generations={len(self.latest)}, recorded={len(self.recorded)})"

    async def accept(self, event: GenerationEvent, message_id: str) -> Disposition:
        """Record ``event`` if it is news about a known generation."""
        disposition = self._decide(event, message_id)
        self.outcomes.append((message_id, disposition))
        return disposition

    def _decide(self, event: GenerationEvent, message_id: str) -> Disposition:
        if message_id in self._message_ids:
            return Disposition.DUPLICATE
        if not self._known(event.generation_id):
            return Disposition.UNKNOWN
        self._message_ids.add(message_id)
        if not supersedes(event, self.latest.get(event.generation_id)):
            return Disposition.STALE
        self.latest[event.generation_id] = event
        self.recorded.append((message_id, event))
        return Disposition.RECORDED

    def status_of(self, generation_id: str) -> str | None:
        """The newest status recorded for ``generation_id`` (event vocabulary), if any."""
        event = self.latest.get(generation_id)
        return None if event is None else event.status.value

"""The receiver's memory of message ids it has acknowledged, bounded.

Why remembering ids for the tolerance window is enough: a delivery whose
signed timestamp is older than the tolerance is refused anyway, so an exact
replay of a captured delivery can only get through while ``timestamp +
tolerance`` has not passed; only the secret's holder can sign the same id
with a newer timestamp, and that is the real sender retrying. Each id is kept
until its signed timestamp plus the tolerance (later sightings extend it).

The memory is a bounded LRU as well, so a flood of genuine events cannot grow
it without end; an id it forgot early is still harmless, because the sink
decides staleness durably (a second copy of a fact changes nothing).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["RecentIds"]


class RecentIds:
    """Message ids with the time until which a replay of them is possible."""

    __slots__ = ("_until", "capacity")

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._until: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def __repr__(self) -> str:
        return f"RecentIds(size={len(self._until)}, capacity={self.capacity})"

    def seen(self, message_id: str, now: float) -> bool:
        """Whether ``message_id`` was remembered and its replay window is still open."""
        until = self._until.get(message_id)
        if until is None:
            return False
        if until < now:
            del self._until[message_id]
            return False
        return True

    def remember(self, message_id: str, until: float, now: float) -> None:
        """Keep ``message_id`` until ``until`` (unix seconds); forget what has expired."""
        known = self._until.pop(message_id, None)
        self._until[message_id] = until if known is None else max(known, until)
        # Windows are all the same length, so the oldest entries expire first (near
        # enough: timestamps differ by at most the tolerance); the first live one stops the sweep.
        while self._until:
            first_id, first_until = next(iter(self._until.items()))
            if first_until >= now and len(self._until) <= self.capacity:
                break
            del self._until[first_id]

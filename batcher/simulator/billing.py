"""Spend per key and monthly period, kept as running totals.

A key with a spend limit is checked on every generation it creates, so the
totals must not cost a scan of every generation: ``used`` is what ended
generations were charged, ``pending`` what in-flight ones were, and a heap of
end times moves charges from pending to used as the clock passes them.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from batcher.simulator.model import Generation

__all__ = ["SpendBook"]

_TERMINAL = frozenset({"complete", "failed"})


@dataclass
class _Account:
    period_start: float
    used: float = 0.0
    pending: float = 0.0
    # (ends_at, sequence, generation): the in-flight charges, soonest end first
    in_flight: list[tuple[float, int, Generation]] = field(default_factory=list)


class SpendBook:
    """USD used and pending per API key in the current monthly period."""

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._seq = itertools.count()

    def _account(self, owner: str, period_start: float) -> _Account:
        account = self._accounts.get(owner)
        if account is None or period_start > account.period_start:
            # A new month starts from zero, as the real spend period does.
            account = self._accounts[owner] = _Account(period_start)
        return account

    def record(self, gen: Generation, period_start: float) -> None:
        """Count ``gen``'s charge as pending until it ends."""
        account = self._account(gen.owner, period_start)
        account.pending += gen.charge_usd
        heapq.heappush(account.in_flight, (gen.ends_at, next(self._seq), gen))

    def totals(self, owner: str, now: float, period_start: float) -> tuple[float, float]:
        """(used, pending) for ``owner`` at clock time ``now``."""
        account = self._account(owner, period_start)
        heap = account.in_flight
        # The phase check guards the instant where float rounding of ends_at and
        # of the phase's own fraction could disagree.
        while heap and heap[0][0] <= now and heap[0][2].phase(now).status in _TERMINAL:
            _, _, gen = heapq.heappop(heap)
            account.pending -= gen.charge_usd
            account.used += gen.charge_usd
        if not heap:
            account.pending = 0.0  # no float dust once nothing is in flight
        return round(account.used, 6), round(max(0.0, account.pending), 6)

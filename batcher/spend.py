"""The local spend cap (``--max-spend``): reserve before every submission.

The API bills per second of audio with a 60 s minimum per generation and
publishes no prices, so the estimate is the user's ``--price-per-minute``
times the audio's minutes (read from the file header; 1 minute when it
cannot be read, e.g. for apiProjectId rows). The cap covers the whole job,
across runs: what earlier runs submitted is counted from the ledger when the
run starts, so re-running with the same cap does not spend it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .model import Kind, LedgerRow

__all__ = ["MIN_BILLED_SECONDS", "SpendCap", "audio_seconds", "billed_seconds"]

# The API bills at least this much processing time per generation request.
MIN_BILLED_SECONDS = 60.0


def audio_seconds(path: Path) -> float | None:
    """The audio's duration from its header, or None when it cannot be read."""
    try:
        import mutagen

        media = mutagen.File(str(path))
    except Exception:  # mutagen raises many types on odd files; unknown is the answer
        return None
    if media is None or getattr(media, "info", None) is None:
        return None
    length = getattr(media.info, "length", None)
    return float(length) if length else None


def billed_seconds(row: LedgerRow) -> float:
    """What one generation of ``row`` is expected to bill (60 s minimum)."""
    seconds = None
    if row.kind is Kind.FILE and row.source_path:
        seconds = audio_seconds(Path(row.source_path))
    return max(MIN_BILLED_SECONDS, seconds or 0.0)


@dataclass(slots=True)
class SpendCap:
    """Estimated spend of the job so far, and the reservations in flight."""

    price_per_minute: float
    cap: float | None = None
    committed: float = 0.0  # submitted in this or earlier runs
    reserved: float = 0.0  # reserved by submissions whose answer is pending
    _by_row: dict[str, float] = field(default_factory=dict)

    def estimate(self, row: LedgerRow) -> float:
        """USD that one generation of ``row`` is expected to cost."""
        return billed_seconds(row) / 60.0 * self.price_per_minute

    def add_earlier(self, row: LedgerRow) -> None:
        """Count a generation an earlier run submitted (and its retries)."""
        self.committed += self.estimate(row) * (1 + row.retry_count)

    def try_reserve(self, row_id: str, usd: float) -> bool:
        """Reserve ``usd`` for a submission; False when it would pass the cap."""
        if self.cap is not None and self.committed + self.reserved + usd > self.cap + 1e-9:
            return False
        self.reserved += usd
        self._by_row[row_id] = self._by_row.get(row_id, 0.0) + usd
        return True

    def settle(self, row_id: str, *, charged: bool) -> float:
        """The submission's answer came: keep the cost (charged) or give it back."""
        usd = self._by_row.pop(row_id, 0.0)
        self.reserved -= usd
        if charged:
            self.committed += usd
        return usd if charged else 0.0

    @property
    def total(self) -> float:
        return self.committed + self.reserved

    def figures(self) -> str:
        """One line for the operator."""
        cap = "none" if self.cap is None else f"${self.cap:,.2f}"
        # Reservations count: they are what a refused submission was refused against.
        return f"estimated spend ${self.total:,.2f} of cap {cap} (submitted or in flight)"

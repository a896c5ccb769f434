"""Live counters of one run: what progress lines, reports and metrics show."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunStats"]


@dataclass(slots=True)
class RunStats:
    """Counters the runner updates as it goes; read by progress and reports.

    Plain attributes on purpose: one event loop writes them, nothing locks.
    """

    started: float = field(default_factory=time.monotonic)
    rows_total: int = 0
    rows_skipped: int = 0  # already complete when the run started
    rows_invalid: int = 0
    done: int = 0
    failed: int = 0
    submitted: int = 0
    replays: int = 0
    in_flight: int = 0
    polls: int = 0
    requests: Counter[str] = field(default_factory=Counter)  # "endpoint status" -> n
    errors: Counter[str] = field(default_factory=Counter)  # error code -> n
    rate_limited: int = 0
    estimated_spend: float = 0.0
    halted: str | None = None
    source_changed: int = 0
    # Generations waiting in the API's queue: row -> position (1 is next).
    queue: dict[str, int] = field(default_factory=dict)
    # File bytes this run has to upload, and has uploaded (or found sent by
    # an earlier run), for the transfer time left under --max-bandwidth.
    upload_bytes: int = 0
    uploaded_bytes: int = 0
    # Webhooks (--webhook-listen): the receiver's counters (None: webhooks off),
    # rows an event moved on, and rows settled by an event before any poll.
    webhooks: Any = None
    webhooks_on: bool = False  # events move rows (a receiver here, or the ledger's)
    events_applied: int = 0
    polls_saved: int = 0
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def on_request(self, endpoint: str, status: int | None, seconds: float) -> None:
        """Feed from the client: one HTTP attempt finished."""
        self.requests[f"{endpoint} {status if status is not None else 'error'}"] += 1
        if status == 429:
            self.rate_limited += 1
        self._recent.append(time.monotonic())

    def request_rate(self, window: float = 5.0) -> float:
        """API requests per second over the last ``window`` seconds."""
        now = time.monotonic()
        recent = sum(1 for t in self._recent if now - t <= window)
        span = min(window, max(now - self.started, 1e-6))
        return recent / span

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def requests_by_endpoint(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for key, n in self.requests.items():
            out[key.rsplit(" ", 1)[0]] += n
        return dict(out)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> float | None:
        """Seconds until the rows of this run are finished, at the pace so far."""
        finished = self.done + self.failed
        todo = self.rows_total - self.rows_skipped - self.rows_invalid - finished
        if finished <= 0 or todo <= 0:
            return None if todo > 0 else 0.0
        return self.elapsed() / finished * todo

    def upload_seconds_left(self, bytes_per_second: float | None) -> float | None:
        """Seconds the uploads left take at ``bytes_per_second`` (None: no cap, or none left)."""
        left = self.upload_bytes - self.uploaded_bytes
        if bytes_per_second is None or left <= 0:
            return None
        return left / bytes_per_second

    def snapshot(self) -> dict[str, Any]:
        """Plain values for a report."""
        return {
            "rowsTotal": self.rows_total,
            "rowsAlreadyComplete": self.rows_skipped,
            "rowsInvalid": self.rows_invalid,
            "completedThisRun": self.done,
            "failedThisRun": self.failed,
            "submitted": self.submitted,
            "idempotentReplays": self.replays,
            "polls": self.polls,
            "requests": self.total_requests,
            "requestsByEndpoint": self.requests_by_endpoint(),
            "requestsByStatus": dict(self.requests),
            "rateLimited": self.rate_limited,
            "errorsByCode": dict(self.errors),
            "estimatedSpendUsd": round(self.estimated_spend, 4),
            "halted": self.halted,
            "sourceChanged": self.source_changed,
            "bytesUploaded": self.uploaded_bytes,
            "durationSeconds": round(self.elapsed(), 3),
            **({"webhooks": self.webhook_snapshot()} if self.webhooks_on else {}),
        }

    def webhook_snapshot(self) -> dict[str, Any]:
        """The receiver's counters plus rows moved by events and polls saved."""
        # No receiver in this process (--webhook-events ledger): its counters are zero.
        snap: dict[str, Any] = (dict(self.webhooks.snapshot()) if self.webhooks else
                                {"received": 0, "recorded": 0, "duplicates": 0, "stale": 0,
                                 "unknown": 0, "sinkErrors": 0, "refused": {}})
        snap.update(eventsApplied=self.events_applied, pollsSaved=self.polls_saved)
        return snap

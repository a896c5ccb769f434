"""What the simulator saw: counters kept live, and the snapshot tests read.

The counters that matter most for batcher's invariants:

- ``extra_charges``: a charge for a logical request (model, source, sampling,
  params) that already had a generation which had not failed. Under a correct
  runner it stays 0 whatever faults were injected.
- ``signed_url_requests_with_key``: a signed storage URL received an API key
  header. Must stay 0.
- ``api_keys_at_upload_host``: an API key reached the upload host (current
  API), where only upload tokens are taken. Must stay 0.
- ``parts_resent``: a part number stored again in the same upload (a retry,
  or a resume that could not know the part had landed).
- ``max_requests_per_second_by_key``: the most requests seen in any sliding
  1 s window, exact (see ``window.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batcher.simulator.window import SlidingWindow

__all__ = ["SimStats", "StatsRecorder", "canonical_json", "logical_request_key"]


def _canonical(value: Any) -> Any:
    # 7 and 7.0 are the same seed, as in the manifest's rules; bools stay bools.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Key-sorted, compact JSON with integral floats written as integers."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))


def logical_request_key(
    model_key: str, source: str, sampling: dict[str, Any], params: dict[str, Any]
) -> str:
    """The id of one logical request: what a correct runner pays for once.

    ``source`` is the sha256 hex of the project's uploaded bytes when it has
    any, else the apiProjectId.
    """
    text = canonical_json([model_key, source, sampling, params])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class SimStats:
    """A snapshot of the simulator's counters; plain data, safe to keep."""

    requests: int = 0
    requests_by_endpoint: dict[str, dict[str, int]] = field(default_factory=dict)
    max_requests_per_second: int = 0
    max_requests_per_second_by_key: dict[str, int] = field(default_factory=dict)
    projects_created: int = 0
    uploads: int = 0
    downloads: int = 0
    generations_created: int = 0
    generations_replayed: int = 0
    generations_without_upload: int = 0
    charges: int = 0
    charged_usd: float = 0.0
    charges_by_key: dict[str, int] = field(default_factory=dict)
    charged_usd_by_key: dict[str, float] = field(default_factory=dict)
    charges_by_request: dict[str, int] = field(default_factory=dict)
    extra_charges: int = 0
    retry_charges: int = 0
    signed_url_requests_with_key: int = 0
    errors_injected: int = 0
    html_errors_injected: int = 0
    truncated_responses: int = 0
    lost_responses: int = 0
    rate_limited: int = 0
    spend_limit_refusals: int = 0
    # The current API: 410s for retired models, and generations refused
    # because their project's upload was not confirmed (409 UPLOAD_MISSING).
    retired_model_refusals: int = 0
    generations_upload_missing: int = 0
    # The current API's uploads: edge calls and complete_project_upload.
    uploads_started: int = 0
    uploads_completed: int = 0
    uploads_aborted: int = 0
    parts_received: int = 0
    parts_resent: int = 0
    part_errors_injected: int = 0
    part_responses_lost: int = 0
    upload_sessions_expired: int = 0
    api_keys_at_upload_host: int = 0
    complete_project_upload_calls: int = 0
    projects_confirmed: int = 0
    # User-Agent header value -> requests (API, upload host and storage);
    # "(none)" counts requests without one.
    user_agents: dict[str, int] = field(default_factory=dict)
    # Wall-clock time (seconds since the epoch) the first API request arrived:
    # the benchmark's "time to the first request" of a client it spawned.
    first_request_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (what ``GET /_sim/stats`` answers)."""
        return dataclasses.asdict(self)

    def status_count(self, endpoint: str, status: int | str) -> int:
        """Requests to ``endpoint`` answered with ``status`` (``"lost"`` for cut ones)."""
        return self.requests_by_endpoint.get(endpoint, {}).get(str(status), 0)


class StatsRecorder:
    """The live counters; the simulator's handlers are its only writers."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self.first_request_at: float | None = None
        self.counts: Counter[str] = Counter()
        self.by_endpoint: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.windows: dict[str, SlidingWindow] = {}
        self.all_keys_window = SlidingWindow()
        self.charges_by_key: Counter[str] = Counter()
        self.usd_by_key: defaultdict[str, float] = defaultdict(float)
        self.charges_by_request: Counter[str] = Counter()
        self.user_agents: Counter[str] = Counter()

    def user_agent(self, value: str | None) -> None:
        """A request (to any route but the control ones) came with this User-Agent."""
        self.user_agents[value if value else "(none)"] += 1

    def arrival(self, api_key: str | None, now: float) -> None:
        """An API request arrived (before any check, 401s and 429s included)."""
        self.counts["requests"] += 1
        if self.first_request_at is None:
            self.first_request_at = self._wall()
        self.all_keys_window.add(now)
        if api_key is not None:
            self.windows.setdefault(api_key, SlidingWindow()).add(now)

    def answered(self, endpoint: str, status: int | str) -> None:
        """The request to ``endpoint`` was answered with ``status``."""
        self.by_endpoint[endpoint][str(status)] += 1

    def bump(self, counter: str, amount: int = 1) -> None:
        """Add to a plain counter named after a :class:`SimStats` field."""
        if counter not in _PLAIN_COUNTERS:
            raise ValueError(f"no SimStats counter named {counter!r}")
        self.counts[counter] += amount

    def charge(self, api_key: str, usd: float, logical_key: str, *, kind: str) -> None:
        """A generation was charged; ``kind`` is ``first``, ``retry`` or ``extra``."""
        self.counts["charges"] += 1
        self.charges_by_key[api_key] += 1
        self.usd_by_key[api_key] += usd
        self.charges_by_request[logical_key] += 1
        if kind == "extra":
            self.counts["extra_charges"] += 1
        elif kind == "retry":
            self.counts["retry_charges"] += 1

    def snapshot(self) -> SimStats:
        """A consistent copy of every counter."""
        usd = {k: round(v, 6) for k, v in self.usd_by_key.items()}
        return SimStats(
            requests_by_endpoint={k: dict(v) for k, v in self.by_endpoint.items()},
            max_requests_per_second=self.all_keys_window.peak,
            max_requests_per_second_by_key={k: w.peak for k, w in self.windows.items()},
            charged_usd=round(sum(self.usd_by_key.values()), 6),
            charges_by_key=dict(self.charges_by_key),
            charged_usd_by_key=usd,
            charges_by_request=dict(self.charges_by_request),
            user_agents=dict(self.user_agents),
            first_request_at=self.first_request_at,
            **{name: self.counts[name] for name in _PLAIN_COUNTERS},
        )


# The SimStats fields that are plain counters, kept in ``StatsRecorder.counts``.
_PLAIN_COUNTERS = tuple(
    f.name for f in dataclasses.fields(SimStats) if f.type in ("int", int)
    and not f.name.startswith("max_requests_per_second")
)

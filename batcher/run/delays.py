"""When to poll a generation next: the wait model of the poller (:mod:`.poll`).

A pure function of what was observed, kept apart from the scheduler: the
first wait (``--poll-interval``, or the predicted duration once there is
one), the wait after a poll that found the generation running (aimed just
past its predicted end, from :mod:`.predict`; a scout read again soon;
otherwise doubling, then growing ×1.5, capped), and when the waits already
scheduled must be revised.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import TYPE_CHECKING

from .predict import EndPredictor

if TYPE_CHECKING:
    from .poll import PollItem

__all__ = [
    "PREDICTION_FLOOR",
    "PREDICTION_MARGIN",
    "REVISION_STEP",
    "SCOUTS",
    "SCOUT_POLLS",
    "SCOUT_STEP",
    "DelayModel",
]

# A predicted poll goes this share of the predicted duration past the
# predicted end (progress is read in whole percents; a poll a hair early
# costs a second poll).
PREDICTION_MARGIN = 0.03
# Closer than this share of the prediction to it, a poll is not aimed again.
PREDICTION_FLOOR = 0.03
# Generations read again on purpose while where inference starts is unknown,
# and how soon after the last reading (a share of the time it took). A scout
# nothing predicts yet is read again, at most SCOUT_POLLS times in all.
SCOUTS = 6
SCOUT_STEP = 0.25
SCOUT_POLLS = 4
# A common prediction moving by more than this share revises every wait.
REVISION_STEP = 0.03


class DelayModel:
    """Decides waits between polls and learns from completed generations.

    Kept apart from the scheduler so the policy is a pure, testable function
    of what was observed.
    """

    def __init__(
        self,
        poll_interval: float,
        *,
        cap: float = 60.0,
        growth: float = 1.5,
        rng: random.Random | None = None,
        quantile: float = 0.9,
        min_samples: int = 5,
    ) -> None:
        self.poll_interval = poll_interval
        self.cap = max(cap, poll_interval)
        self.growth = growth
        self.quantile = quantile
        self.min_samples = min_samples
        self._rng = rng or random.Random()
        self._samples: deque[float] = deque(maxlen=256)
        self.predictor = EndPredictor()
        self._scouts = 0
        # The aimed first poll, start share and pre-processing ratio the
        # scheduled waits were last revised for.
        self._revised: tuple[float | None, float | None, float | None] = (None, None, None)

    def observe(self, seconds: float) -> None:
        """A generation took ``seconds`` from acceptance to observed completion."""
        if seconds >= 0 and math.isfinite(seconds):
            self._samples.append(seconds)

    def learned(self) -> float | None:
        """The duration most generations finish within, once enough were seen."""
        if len(self._samples) < self.min_samples:
            return None
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, int(self.quantile * len(ordered)))
        return ordered[index]

    def aimed_first(self) -> float | None:
        """The first poll's elapsed time by what was learned of durations, if anything.

        Just past the duration most generations of the job take (the
        ``quantile`` of the predicted ends of generations read at a first
        poll no prediction chose), else past the common line's end; never
        before ``--poll-interval``.
        """
        margin = 1.0 + PREDICTION_MARGIN
        most = self.predictor.typical(self.quantile)
        if most is not None:
            # Widely spread durations: a generation of the typical (median)
            # length still waits no more than about --poll-interval to be
            # noticed; the longer ones are read at that poll, and predicted.
            median = self.predictor.typical(0.5)
            assert median is not None
            aim = min(most * margin, median + self.poll_interval)
            return max(self.poll_interval, aim)
        total = self.predictor.total()
        if total is None:
            return None
        return max(self.poll_interval, total * margin)

    def first(self) -> float:
        """Wait before the first poll of a fresh generation."""
        aimed = self.aimed_first()
        if aimed is not None:
            return min(aimed, self.cap)
        learned = self.learned()
        base = self.poll_interval if learned is None else max(self.poll_interval, learned)
        # Jitter (never earlier than asked): rows accepted together are not
        # polled in step, and their readings, spread over time, show how fast
        # generations progress.
        return min(base, self.cap) * self._rng.uniform(1.0, 1.2)

    def _scout(self, item: PollItem, target: float | None) -> bool:
        """Whether to read ``item`` again soon, to learn from it (counted)."""
        if item.scout:
            # Read again while nothing predicts it (a second reading in
            # pre-processing, a first in inference), a few times at most.
            go = target is None and item.scouted < SCOUT_POLLS
        else:
            learning = item.previous is None and self.predictor.start_share() is None
            go = self._scouts < SCOUTS and (learning or target is None)
            if go:
                self._scouts += 1
                item.scout = True
        if go:
            item.scouted += 1
        return go

    def predicted(self, item: PollItem) -> float | None:
        """Elapsed seconds at which to poll ``item`` next by the prediction, if any."""
        if item.reading is None:
            if item.polls > 0:
                return None  # polled, but said nothing about its progress
            return self.aimed_first()
        end = self.predictor.end(item.reading, item.previous)
        if end is None:
            return None
        return end * (1.0 + PREDICTION_MARGIN)

    def needs_revision(self) -> bool:
        """True when a prediction appeared or moved since the last revision."""
        predictor = self.predictor
        now = (self.aimed_first(), predictor.start_share(), predictor.pre_ratio())
        changed = False
        for value, old in zip(now, self._revised, strict=True):
            if value is None:
                continue
            # A predicted end moves in proportion to each of them.
            if old is None or abs(value - old) > REVISION_STEP * max(old, 0.1):
                changed = True
        if changed:
            self._revised = now
        return changed

    def next(self, item: PollItem, now: float | None = None) -> float:
        """Wait after a poll that found the generation still running.

        Once durations are learned, aim at the moment most generations are
        done (``submitted_at + learned``); past it, poll at a short floor
        that grows. Before anything is learned, double the wait each time, so
        a run of long generations costs few polls while it learns.
        """
        target = self.predicted(item)
        elapsed = 0.0 if now is None else now - item.submitted_at
        if item.reading is not None and not item.resumed and self._scout(item, target):
            # A scout: read this generation again soon. Two readings of a few
            # generations tell where inference (and pre-processing) starts,
            # and then one reading predicts any generation's end, whatever
            # its length.
            soon = SCOUT_STEP * item.reading.elapsed
            return soon if target is None else min(soon, max(target - elapsed, 0.0) or soon)
        if target is not None and not item.resumed:
            remaining = target - elapsed
            # Past the predicted end and still running: the prediction was
            # short; fall back to short, growing waits.
            if remaining > PREDICTION_FLOOR * target:
                return min(remaining, self.cap)
        learned = self.learned()
        if learned is None:
            # Double for the first few polls (long generations cost few polls
            # while the run learns), then grow gently.
            factor = 2.0 if item.polls <= 3 else self.growth
            wait = min(self.cap, max(self.poll_interval, item.delay * factor))
        else:
            floor = max(self.poll_interval * 0.5, 0.15 * learned, 0.05)
            remaining = learned - elapsed
            if remaining > floor:
                wait = remaining
            else:
                grown = min(self.cap, max(floor, item.delay * self.growth))
                wait = floor if item.polls <= 1 else grown
        # Jitter keeps thousands of rows submitted together from polling in step.
        return wait * self._rng.uniform(0.9, 1.1)

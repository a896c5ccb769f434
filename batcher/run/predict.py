"""When will a running generation end? A prediction from what the answers said.

A poll that finds a generation still running says how far it got: the
inference stage's ``progress`` (percent). Two readings of one generation
give its speed, so its end: the straight line through them reaches 100 %.
They also say where in the generation's life the inference stage began
(the share ``s`` of the whole spent before it, queued and pre-processing):
inference runs over ``(1 - s)`` of the duration, so ``D = t / (s + p (1 - s))``
for a reading of ``p`` at ``t`` seconds. Once a few generations read twice
have told ``s``, one reading is enough for any generation, whatever its
length. Before that, the speed comes from the other generations: those of
one job are alike (one model, similar inputs), so the readings of all of
them, elapsed time against progress, lie near one line whose slope is the
common speed. :class:`EndPredictor` fits that line (least squares over the
recent readings); the line's own end says when a generation not yet polled
should end.

The predictor is pure: it holds readings and returns seconds; the poller
(:mod:`.poll`) decides waits from them, and revises the waits already
scheduled when the line first appears or moves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["EndPredictor", "Reading"]


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of a running generation: ``elapsed`` seconds since it was accepted."""

    elapsed: float
    fraction: float  # the inference stage's progress, 0 < fraction < 1


class EndPredictor:
    """Fits elapsed time against progress over the job's recent readings.

    ``min_points`` readings whose elapsed times have a standard deviation of
    at least ``min_spread`` of their mean are needed before the common line
    is trusted.
    """

    def __init__(self, *, window: int = 128, min_points: int = 8,
                 min_spread: float = 0.02) -> None:
        self.min_points = min_points
        self.min_spread = min_spread
        self._points: deque[Reading] = deque(maxlen=window)
        self._fit: tuple[float, float] | None = None  # (intercept, slope) of fraction = a + b*t
        self._dirty = False
        self._st = self._sf = self._stt = self._stf = 0.0
        self._starts: deque[float] = deque(maxlen=window)  # samples of s
        self.min_starts = 3
        self._start: float | None = None  # their median, kept (asked for every poll)

    def observe(self, reading: Reading) -> None:
        """A running generation's reading (fractions outside (0, 1) say nothing)."""
        if 0.0 < reading.fraction < 1.0 and reading.elapsed > 0.0:
            points = self._points
            if len(points) == points.maxlen:
                self._add(points[0], -1.0)  # the oldest leaves the window
            points.append(reading)
            self._add(reading, 1.0)
            self._dirty = True

    def _add(self, r: Reading, sign: float) -> None:
        """Running sums of the window, so a fit costs the same at any window size."""
        t, f = r.elapsed, r.fraction
        self._st += sign * t
        self._sf += sign * f
        self._stt += sign * t * t
        self._stf += sign * t * f

    def observe_pair(self, previous: Reading, last: Reading) -> None:
        """One generation read twice, moving: a sample of where inference starts."""
        df, dt = last.fraction - previous.fraction, last.elapsed - previous.elapsed
        if df <= 0.0 or dt <= 0.0:
            return
        span = dt / df  # seconds the whole inference stage takes
        total = last.elapsed + (1.0 - last.fraction) * span
        start = 1.0 - span / total
        if 0.0 <= start < 1.0:
            self._starts.append(start)
            if len(self._starts) >= self.min_starts:
                ordered = sorted(self._starts)
                self._start = ordered[len(ordered) // 2]

    def start_share(self) -> float | None:
        """The median share of a generation's life before inference, once sampled."""
        return self._start

    def slope(self) -> float | None:
        """The common speed (fraction per second), once enough readings agree."""
        fit = self._line()
        return None if fit is None else fit[1]

    def total(self) -> float | None:
        """Seconds a generation takes from acceptance to 100 %, by the common line."""
        fit = self._line()
        if fit is None:
            return None
        a, b = fit
        end = (1.0 - a) / b
        return end if end > 0.0 else None

    def end(self, last: Reading, previous: Reading | None = None) -> float | None:
        """Elapsed seconds at which the generation read as ``last`` should end.

        Its own speed when it was read twice and moved; else its reading
        and where inference starts, once known; else the common speed; else
        None (nothing to go on yet).
        """
        if previous is not None and last.fraction > previous.fraction \
                and last.elapsed > previous.elapsed:
            speed = (last.fraction - previous.fraction) / (last.elapsed - previous.elapsed)
            return last.elapsed + (1.0 - last.fraction) / speed
        start = self.start_share()
        if start is not None:
            return last.elapsed / (start + last.fraction * (1.0 - start))
        slope = self.slope()
        if slope is None:
            return None
        return last.elapsed + (1.0 - last.fraction) / slope

    def _line(self) -> tuple[float, float] | None:
        if not self._dirty:
            return self._fit
        self._dirty = False
        self._fit = None
        n = len(self._points)
        if n < self.min_points:
            return None
        mean_t, mean_f = self._st / n, self._sf / n
        var = self._stt / n - mean_t * mean_t  # per reading
        # Readings spread over time: their standard deviation, at least
        # min_spread of the mean elapsed time (rounding can make var < 0).
        if var <= (self.min_spread * mean_t) ** 2:
            return None
        slope = (self._stf / n - mean_t * mean_f) / var
        if slope <= 0.0:
            return None
        self._fit = (mean_f - slope * mean_t, slope)
        return self._fit

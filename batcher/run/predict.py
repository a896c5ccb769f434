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

Before inference, the answer may also say how far pre-processing got
(``stageProgress``). Pre-processing runs between two shares of a generation's
life, from where it starts (after the queue) to ``s``; two pre-processing
readings of one generation give when it started and when it will end, and
the ratio of those two times, learned from a few generations like ``s``, is
the same for generations of any length. With both learned, one
pre-processing reading predicts the end: pre-processing ends at ``s D``.
An answer without stage progress (the seed-era API) gives no such reading,
and the prediction waits for inference as before.

The predictor is pure: it holds readings and returns seconds; the poller
(:mod:`.poll`) decides waits from them, and revises the waits already
scheduled when the line first appears or moves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["MIN_SAMPLE_STEP", "EndPredictor", "Reading"]

# Progress is read in whole percents, and a reading's moment is known to a
# few milliseconds: a sample of where a stage starts is taken only from
# readings at least this far apart (or this far into inference), so neither
# rounding nor timing weighs much in it.
MIN_SAMPLE_STEP = 0.1


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of a running generation: ``elapsed`` seconds since it was accepted."""

    elapsed: float
    fraction: float  # the stage's progress, 0 < fraction < 1
    # True: the pre-processing stage's progress (inference not begun).
    pre: bool = False

    def after(self, other: Reading) -> bool:
        """Whether this reading is further into the generation than ``other``."""
        if self.pre != other.pre:
            return other.pre
        return self.fraction > other.fraction


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
        # Samples of the pre-processing stage's start over its end (elapsed times).
        self._ratios: deque[float] = deque(maxlen=window)
        self._ratio: float | None = None  # their median
        # First readings of generations whose first poll was not aimed by a
        # prediction: a sample of the job's durations (see typical()).
        self._firsts: deque[Reading] = deque(maxlen=window)
        self._typical: dict[float, float | None] = {}
        self._typical_key: tuple[object, ...] | None = None
        self._unread = 0

    def observe(self, reading: Reading) -> None:
        """A running generation's reading (fractions outside (0, 1) say nothing).

        Only inference readings go into the common line.
        """
        if 0.0 < reading.fraction < 1.0 and reading.elapsed > 0.0 and not reading.pre:
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
        """One generation read twice, moving: a sample of where a stage starts.

        Two inference readings sample ``s``; two pre-processing readings the
        ratio of pre-processing's start to its end; a pre-processing reading
        then an inference one sample ``s`` once that ratio is known.
        """
        if previous.pre and not last.pre:
            pre_end = self.pre_end(previous)
            if pre_end is None or not 0.0 < pre_end < last.elapsed \
                    or last.fraction < MIN_SAMPLE_STEP:
                return
            total = pre_end + (last.elapsed - pre_end) / last.fraction
            self._sample(self._starts, pre_end / total)
            self._start = self._median(self._starts, self._start)
            return
        if previous.pre != last.pre:
            return  # out of order: says nothing
        df, dt = last.fraction - previous.fraction, last.elapsed - previous.elapsed
        if df < MIN_SAMPLE_STEP or dt <= 0.0:
            return
        span = dt / df  # seconds the whole stage takes
        end = last.elapsed + (1.0 - last.fraction) * span
        if last.pre:
            # Rounding to whole percents can put a start right after the
            # queue a hair below zero.
            self._sample(self._ratios, max(0.0, 1.0 - span / end), low=-0.1)
            self._ratio = self._median(self._ratios, self._ratio)
        else:
            self._sample(self._starts, 1.0 - span / end)
            self._start = self._median(self._starts, self._start)

    @staticmethod
    def _sample(samples: deque[float], value: float, *, low: float = 0.0) -> None:
        if low <= value < 1.0:
            samples.append(max(0.0, value))

    def _median(self, samples: deque[float], current: float | None) -> float | None:
        if len(samples) < self.min_starts:
            return current
        ordered = sorted(samples)
        return ordered[len(ordered) // 2]

    def pre_ratio(self) -> float | None:
        """The median ratio of pre-processing's start to its end, once sampled."""
        return self._ratio

    def pre_end(self, reading: Reading) -> float | None:
        """Elapsed seconds at which pre-processing ends, from one reading of it."""
        ratio = self._ratio
        if ratio is None or not reading.pre:
            return None
        return reading.elapsed / (ratio + reading.fraction * (1.0 - ratio))

    def observe_first(self, reading: Reading, *, unread: bool = False) -> None:
        """The first reading of a generation first polled after a wait no prediction chose.

        Which generations are polled so does not depend on what was
        learned, so their predicted ends sample the job's durations fairly.
        (Readings at polls aimed at a learned duration would not: only
        generations longer than it are still running then.) ``unread``: it
        was counted by :meth:`unread` (its first poll said nothing).
        """
        if unread:
            self.unread(-1)
        if 0.0 < reading.fraction < 1.0 and reading.elapsed > 0.0:
            self._firsts.append(reading)

    def unread(self, change: int) -> None:
        """Generations of that sample found running but not read yet (+1), or no more (-1).

        While many are, the readings taken are no fair sample (those read
        first are the furthest along, often the shortest): :meth:`typical`
        waits.
        """
        self._unread = max(0, self._unread + change)

    def typical(self, quantile: float) -> float | None:
        """The duration ``quantile`` of generations take at most, by the first readings.

        Each first reading's one-reading prediction (so only once where the
        stages start, or the common speed, is known); None until
        ``min_points`` of them predict, and while more than a quarter as
        many of the sampled generations are running unread.
        """
        key = (len(self._firsts), self._firsts[-1] if self._firsts else None,
               self._start, self._ratio, self.slope(), self._unread)
        if key != self._typical_key:
            self._typical_key, self._typical = key, {}
        if quantile not in self._typical:
            ends = sorted(e for e in map(self.end, self._firsts) if e is not None and e > 0.0)
            value = None
            if len(ends) >= max(self.min_points, 4 * self._unread):
                value = ends[min(len(ends) - 1, int(quantile * len(ends)))]
            self._typical[quantile] = value
        return self._typical[quantile]

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

        For an inference reading: its own speed when it was read twice in
        inference and moved; else, after a pre-processing reading, the
        inference stage's speed from when pre-processing ended; else its
        reading and where inference starts, once known; else the common
        speed; else None (nothing to go on yet). For a pre-processing
        reading: when pre-processing ends (from its own two readings, or one
        and the learned ratio), over where inference starts.
        """
        if last.pre:
            return self._end_of_pre(last, previous)
        if previous is not None and not previous.pre and last.fraction > previous.fraction \
                and last.elapsed > previous.elapsed:
            speed = (last.fraction - previous.fraction) / (last.elapsed - previous.elapsed)
            return last.elapsed + (1.0 - last.fraction) / speed
        if previous is not None and previous.pre:
            pre_end = self.pre_end(previous)
            if pre_end is not None and 0.0 < pre_end < last.elapsed:
                return pre_end + (last.elapsed - pre_end) / last.fraction
        start = self.start_share()
        if start is not None:
            return last.elapsed / (start + last.fraction * (1.0 - start))
        slope = self.slope()
        if slope is None:
            return None
        return last.elapsed + (1.0 - last.fraction) / slope

    def _end_of_pre(self, last: Reading, previous: Reading | None) -> float | None:
        start = self.start_share()
        if start is None or start <= 0.0:
            return None
        if previous is not None and previous.pre and last.fraction > previous.fraction \
                and last.elapsed > previous.elapsed:
            span = (last.elapsed - previous.elapsed) / (last.fraction - previous.fraction)
            pre_end: float | None = last.elapsed + (1.0 - last.fraction) * span
        else:
            pre_end = self.pre_end(last)
        return None if pre_end is None else pre_end / start

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

"""Poll prediction: when a running generation should end, from its progress readings."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.run.delays import PREDICTION_MARGIN, SCOUT_STEP, SCOUTS, DelayModel
from batcher.run.poll import PollItem
from batcher.run.predict import EndPredictor, Reading


def reading(t: float, duration: float, start: float) -> Reading:
    """What the simulator's model answers: inference runs over the last (1 - start)."""
    return Reading(t, (t / duration - start) / (1.0 - start))


@given(duration=st.floats(1.0, 600.0), start=st.floats(0.0, 0.6),
       a=st.floats(0.65, 0.8), b=st.floats(0.85, 0.99))
def test_two_readings_of_one_generation_give_its_end(duration: float, start: float,
                                                     a: float, b: float) -> None:
    end = EndPredictor().end(reading(b * duration, duration, start),
                             reading(a * duration, duration, start))
    assert end == pytest.approx(duration, rel=1e-6)


def test_where_inference_starts_is_learned_then_one_reading_is_enough() -> None:
    predictor = EndPredictor()
    assert predictor.start_share() is None
    for duration in (2.0, 3.0, 4.0):
        predictor.observe_pair(reading(0.7 * duration, duration, 0.3),
                               reading(0.9 * duration, duration, 0.3))
    assert predictor.start_share() == pytest.approx(0.3)
    # Any length, one reading.
    assert predictor.end(reading(5.0, 7.5, 0.3)) == pytest.approx(7.5)


def test_the_common_line_of_alike_generations_gives_their_duration() -> None:
    predictor = EndPredictor()
    rng = random.Random(5)
    for _ in range(7):
        predictor.observe(reading(rng.uniform(27, 33), 40.0, 0.3))
    assert predictor.total() is None  # too few readings yet
    predictor.observe(reading(30.0, 40.0, 0.3))
    assert predictor.total() == pytest.approx(40.0, rel=1e-6)
    # One reading of a row: its end by the common speed.
    assert predictor.end(reading(31.0, 40.0, 0.3)) == pytest.approx(40.0, rel=1e-6)


def test_readings_at_one_moment_fit_no_line() -> None:
    predictor = EndPredictor()
    for _ in range(20):
        predictor.observe(reading(30.0, 40.0, 0.3))
    assert predictor.total() is None


def test_a_predicted_poll_aims_just_past_the_end_and_unpolled_rows_are_revised() -> None:
    model = DelayModel(30.0, rng=random.Random(1))
    item = PollItem("r", "g", "p", submitted_at=100.0, polls=1)
    item.read(reading(30.0, 40.0, 0.3))
    fresh = PollItem("s", "h", "p", submitted_at=101.0)
    assert model.predicted(fresh) is None and not model.needs_revision()
    for t in (27.0, 28.0, 29.0, 30.0, 31.0, 32.0, 33.0, 29.5):
        model.predictor.observe(reading(t, 40.0, 0.3))
    assert model.needs_revision() and not model.needs_revision()  # once per change
    target = 40.0 * (1 + PREDICTION_MARGIN)
    assert model.predicted(fresh) == pytest.approx(target)
    # The next wait after a poll at 30 s: to the predicted end, without jitter
    # (once where inference starts is known: no scouting).
    for duration in (39.0, 40.0, 41.0):
        model.predictor.observe_pair(reading(0.7 * duration, duration, 0.3),
                                     reading(0.9 * duration, duration, 0.3))
    assert model.next(item, now=130.0) == pytest.approx(target - 30.0)
    # Past it and still running: short waits again, not a wait aimed backwards.
    late = model.next(item, now=100.0 + target)
    assert 0 < late <= 30.0 * 1.1


def test_a_few_scouts_are_read_again_soon_until_the_start_is_known() -> None:
    model = DelayModel(1.0, rng=random.Random(2))
    waits = []
    for i in range(SCOUTS + 2):
        item = PollItem(f"r{i}", "g", "p", submitted_at=0.0, polls=1)
        item.read(reading(2.0, 3.0, 0.3))
        waits.append(model.next(item, now=2.0))
    assert waits[:SCOUTS] == [pytest.approx(SCOUT_STEP * 2.0)] * SCOUTS
    assert all(w != pytest.approx(SCOUT_STEP * 2.0) for w in waits[SCOUTS:])

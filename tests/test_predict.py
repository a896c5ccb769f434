"""Poll prediction: when a running generation should end, from its progress readings."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.answers import GenerationStatus, Progress
from batcher.run.delays import PREDICTION_MARGIN, SCOUT_POLLS, SCOUT_STEP, SCOUTS, DelayModel
from batcher.run.poll import PollItem, progress_reading
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


# Pre-processing: a generation of ``duration`` waits in the queue for the
# first ``queue`` share of it, pre-processes until ``start``, then infers.
def pre_reading(t: float, duration: float, queue: float, start: float) -> Reading:
    return Reading(t, (t / duration - queue) / (start - queue), pre=True)


def learned(queue: float, start: float) -> EndPredictor:
    """A predictor that saw three generations read twice in each stage."""
    predictor = EndPredictor()
    for duration in (2.0, 3.0, 4.0):
        mid = (queue + start) / 2.0
        predictor.observe_pair(pre_reading((mid - 0.06) * duration, duration, queue, start),
                               pre_reading((mid + 0.06) * duration, duration, queue, start))
        predictor.observe_pair(reading(0.7 * duration, duration, start),
                               reading(0.9 * duration, duration, start))
    return predictor


@given(duration=st.floats(0.5, 3600.0), queue=st.floats(0.0, 0.3),
       width=st.floats(0.1, 0.4), at=st.floats(0.05, 0.95))
def test_once_learned_one_pre_processing_reading_gives_the_end(
        duration: float, queue: float, width: float, at: float) -> None:
    start = queue + width
    predictor = learned(queue, start)
    assert predictor.pre_ratio() == pytest.approx(queue / start, abs=1e-9)
    assert predictor.start_share() == pytest.approx(start)
    t = (queue + at * width) * duration
    assert predictor.end(pre_reading(t, duration, queue, start)) == pytest.approx(duration,
                                                                                 rel=1e-6)


@given(duration=st.floats(0.5, 3600.0), queue=st.floats(0.0, 0.3),
       width=st.floats(0.1, 0.4), a=st.floats(0.05, 0.4), b=st.floats(0.55, 0.95))
def test_two_pre_processing_readings_and_the_start_give_the_end(
        duration: float, queue: float, width: float, a: float, b: float) -> None:
    start = queue + width
    predictor = EndPredictor()
    for d in (2.0, 3.0, 4.0):
        predictor.observe_pair(reading(0.7 * d, d, start), reading(0.9 * d, d, start))
    assert predictor.pre_ratio() is None  # only where inference starts is known
    first = pre_reading((queue + a * width) * duration, duration, queue, start)
    second = pre_reading((queue + b * width) * duration, duration, queue, start)
    assert predictor.end(second, first) == pytest.approx(duration, rel=1e-6)
    # One pre-processing reading alone says nothing yet.
    assert predictor.end(second) is None


def test_a_pre_processing_then_an_inference_reading_teach_where_inference_starts() -> None:
    predictor = EndPredictor()
    for d in (2.0, 3.0, 4.0):
        predictor.observe_pair(pre_reading(0.15 * d, d, 0.1, 0.3),
                               pre_reading(0.25 * d, d, 0.1, 0.3))
    assert predictor.start_share() is None
    for d in (2.0, 3.0, 5.0):
        before, after = pre_reading(0.2 * d, d, 0.1, 0.3), reading(0.6 * d, d, 0.3)
        assert predictor.end(after, before) == pytest.approx(d)  # its own end already
        predictor.observe_pair(before, after)
    assert predictor.start_share() == pytest.approx(0.3)


def test_readings_too_close_teach_nothing() -> None:
    predictor = EndPredictor()
    for d in (2.0, 3.0, 4.0):  # 5 points apart: rounding would weigh too much
        predictor.observe_pair(reading(0.70 * d, d, 0.3), reading(0.735 * d, d, 0.3))
        predictor.observe_pair(pre_reading(0.15 * d, d, 0.1, 0.3),
                               pre_reading(0.16 * d, d, 0.1, 0.3))
    assert predictor.start_share() is None and predictor.pre_ratio() is None


def test_nothing_is_predicted_from_pre_processing_without_where_inference_starts() -> None:
    """The seed-era API sends no stage progress; a job that only ever saw
    pre-processing readings has nothing to turn them into an end with."""
    predictor = EndPredictor()
    for d in (2.0, 3.0, 4.0):
        predictor.observe_pair(pre_reading(0.15 * d, d, 0.1, 0.3),
                               pre_reading(0.25 * d, d, 0.1, 0.3))
    assert predictor.pre_ratio() == pytest.approx(1 / 3)
    assert predictor.end(pre_reading(0.5, 3.0, 0.1, 0.3)) is None


def test_an_inference_reading_is_further_than_any_pre_processing_one() -> None:
    item = PollItem("r", "g", "p", submitted_at=0.0)
    item.read(Reading(1.0, 0.9, pre=True))
    item.read(Reading(1.2, 0.05))
    item.read(Reading(1.3, 0.95, pre=True))  # out of order: ignored
    assert item.reading == Reading(1.2, 0.05) and item.previous == Reading(1.0, 0.9, pre=True)


def test_typical_durations_wait_for_the_unread_part_of_the_sample() -> None:
    predictor = learned(0.1, 0.3)
    durations = [2.0 + 0.2 * i for i in range(11)]  # 2.0 .. 4.0
    predictor.unread(3)
    for d in durations[:8]:
        predictor.observe_first(pre_reading(0.2 * d, d, 0.1, 0.3))
    # Eight read, three running unread (the longer ones, read later): not yet.
    assert predictor.typical(0.5) is None
    for d in durations[8:]:
        predictor.observe_first(pre_reading(0.2 * d, d, 0.1, 0.3), unread=True)
    assert predictor.typical(0.5) == pytest.approx(3.0)
    assert predictor.typical(0.9) == pytest.approx(3.8)


@given(durations=st.lists(st.floats(1.0, 100.0), min_size=8, max_size=60),
       interval=st.floats(0.1, 50.0))
def test_the_first_poll_aims_past_most_durations_but_not_far_past_the_median(
        durations: list[float], interval: float) -> None:
    model = DelayModel(interval, rng=random.Random(3))
    predictor = model.predictor
    for d in (2.0, 3.0, 4.0):
        predictor.observe_pair(reading(0.7 * d, d, 0.3), reading(0.9 * d, d, 0.3))
    for d in durations:
        predictor.observe_first(reading(0.8 * d, d, 0.3))
    aim = model.aimed_first()
    assert aim is not None and aim >= interval  # never before the interval
    ordered = sorted(durations)
    most = ordered[min(len(ordered) - 1, int(model.quantile * len(ordered)))]
    median = ordered[len(ordered) // 2]
    assert aim == pytest.approx(max(interval, min(most * (1 + PREDICTION_MARGIN),
                                                  median + interval)), rel=1e-6)
    # An unpolled row is aimed there too.
    assert model.predicted(PollItem("s", "h", "p", submitted_at=0.0)) == pytest.approx(aim)


def test_a_scout_nothing_predicts_is_read_again_a_few_times() -> None:
    model = DelayModel(0.5, rng=random.Random(4))
    item = PollItem("r", "g", "p", submitted_at=0.0)
    waits = []
    for i in range(SCOUT_POLLS + 2):
        item.polls += 1
        t = 0.5 * 1.25 ** i
        item.read(Reading(t, min(0.99, 0.1 + 0.2 * i), pre=True))
        waits.append(model.next(item, now=t))
    assert item.scout and item.scouted == SCOUT_POLLS
    assert waits[:SCOUT_POLLS] == [pytest.approx(SCOUT_STEP * 0.5 * 1.25 ** i)
                                   for i in range(SCOUT_POLLS)]
    # Then the ordinary waits: doubling (nothing learned), never a burst.
    assert all(w >= 0.5 * 0.9 for w in waits[SCOUT_POLLS:])


def test_a_new_pre_processing_ratio_revises_the_scheduled_polls() -> None:
    model = DelayModel(0.5, rng=random.Random(5))
    assert not model.needs_revision()
    for d in (2.0, 3.0, 4.0):
        model.predictor.observe_pair(pre_reading(0.15 * d, d, 0.1, 0.3),
                                     pre_reading(0.25 * d, d, 0.1, 0.3))
    assert model.needs_revision() and not model.needs_revision()


def answer(inference: int | None, stages: dict[str, int] | None) -> Progress:
    return Progress("g", "p", GenerationStatus.RUNNING, "processing", inference, None, None,
                    stage_progress=stages)


def test_what_an_answer_says_about_how_far_a_generation_got() -> None:
    assert progress_reading(answer(40, {"preProcessing": 100, "inference": 40}), 2.0) \
        == Reading(2.0, 0.4)
    assert progress_reading(answer(0, {"preProcessing": 35, "inference": 0}), 0.5) \
        == Reading(0.5, 0.35, pre=True)
    # The seed-era API: no stage progress, so before inference nothing to read.
    assert progress_reading(answer(0, None), 0.5) is None
    assert progress_reading(answer(None, None), 0.5) is None
    # 0 % (queued) and 100 % (ended, but not when) say nothing either.
    assert progress_reading(answer(0, {"preProcessing": 0, "inference": 0}), 0.2) is None
    assert progress_reading(answer(0, {"preProcessing": 100, "inference": 0}), 0.9) is None
    assert progress_reading(answer(100, {"preProcessing": 100, "inference": 100}), 3.0) is None

from __future__ import annotations

import math

import pytest

from devinterp_lightning.schedule import EveryNSteps, ExplicitSteps, LogSpaced, as_schedule


def test_every_n_steps_due_and_next():
    s = EveryNSteps(5)
    assert s.due_steps(20) == [0, 5, 10, 15, 20]
    assert [s.is_due(i) for i in range(7)] == [True, False, False, False, False, True, False]
    assert s.next_due(6) == 10
    s = EveryNSteps(4, start=3)
    assert s.due_steps(12) == [3, 7, 11]
    assert not s.is_due(0)


def test_log_spaced_is_geometric_and_dense_early():
    s = LogSpaced(start=10, per_decade=5)
    assert s.due_steps(1000) == [0, 10, 16, 25, 40, 63, 100, 158, 251, 398, 631, 1000]
    # cost grows like log(steps): 5 more per decade
    assert len(s.due_steps(10_000)) == len(s.due_steps(1000)) + 5
    for step in s.due_steps(1000):
        assert s.is_due(step)
    assert not s.is_due(11)


def test_log_spaced_small_start_dedupes_after_rounding():
    steps = LogSpaced(start=1, per_decade=10, include_zero=False).due_steps(30)
    assert steps == sorted(set(steps))
    assert steps[:5] == [1, 2, 3, 4, 5]


def test_log_spaced_max_interval_caps_gap():
    s = LogSpaced(start=10, per_decade=4, max_interval=100)
    steps = s.due_steps(1000)
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert max(gaps) <= 100
    assert steps[-1] == 1000 or 1000 - steps[-1] < 100
    # early part is still geometric
    assert steps[:4] == [0, 10, 18, 32]


def test_explicit_steps():
    s = as_schedule([30, 0, 10, 10])
    assert isinstance(s, ExplicitSteps)
    assert s.due_steps(100) == [0, 10, 30]
    assert s.next_due(11) == 30
    assert s.next_due(31) is None


def test_as_schedule_forms():
    assert isinstance(as_schedule(7), EveryNSteps)
    log = LogSpaced()
    assert as_schedule(log) is log
    with pytest.raises(TypeError, match="schedule must be"):
        as_schedule("often")
    with pytest.raises(ValueError, match="positive integer"):
        as_schedule(0)
    with pytest.raises(ValueError, match="empty"):
        as_schedule([])


def test_validate_rejects_schedules_beyond_the_run():
    with pytest.raises(ValueError, match="no step in 1..50.*raise max_steps"):
        EveryNSteps(100).validate(50)
    EveryNSteps(100).validate(100)
    EveryNSteps(100).validate(math.inf)
    with pytest.raises(ValueError, match=r"\[80, 120\] are beyond the 60"):
        ExplicitSteps([10, 80, 120]).validate(60)
    with pytest.raises(ValueError, match="no step in 1..5"):
        LogSpaced(start=10).validate(5)


def test_adaptive_halves_on_movement_and_doubles_on_plateaus():
    from devinterp_lightning.schedule import Adaptive

    s = Adaptive(min_interval=10, max_interval=80, threshold=2.0)
    assert s.is_due(0) and not Adaptive(include_zero=False).is_due(0)
    s.observe(0, 1.0, 0.1)
    assert s.next == 10  # first interval: min_interval
    visited = []
    # plateau: value constant within noise -> 20, 40, 80, 80 (capped)
    for value in (1.0, 1.05, 0.98, 1.02):
        step = s.next
        assert s.is_due(step) and not s.is_due(step - 1)
        s.observe(step, value, 0.1)
        visited.append(s.interval)
    assert visited == [20, 40, 80, 80]
    # a jump of 5 standard errors -> interval halves each time it keeps moving
    step = s.next
    s.observe(step, 2.0, 0.1)
    assert s.interval == 40
    s.observe(s.next, 3.0, 0.1)
    assert s.interval == 20
    # a nan estimate (all chains diverged) keeps the interval and the reference value
    s.observe(s.next, float("nan"), float("nan"))
    assert s.interval == 20 and s.previous == (3.0, 0.1)


def test_adaptive_state_round_trip_and_validation():
    from devinterp_lightning.schedule import Adaptive

    s = Adaptive(min_interval=5, max_interval=50)
    s.observe(0, 1.0, 0.1)
    s.observe(5, 3.0, 0.1)
    t = Adaptive(min_interval=5, max_interval=50)
    t.load_state_dict(s.state_dict())
    assert (t.interval, t.next, t.previous) == (s.interval, s.next, s.previous)
    with pytest.raises(ValueError, match="min_interval=5 is beyond the 3"):
        s.validate(3)
    with pytest.raises(ValueError, match="max_interval must be an integer >= min_interval"):
        Adaptive(min_interval=10, max_interval=5)


@pytest.mark.parametrize("total", [math.inf, -1, -1.0])
def test_an_unknown_run_length_validates_every_schedule(total: float):
    # Lightning reports an IterableDataset run without max_steps as -1 (or inf) steps
    from devinterp_lightning.schedule import Adaptive

    for schedule in (EveryNSteps(50), LogSpaced(), ExplicitSteps([5, 10**9]), Adaptive(min_interval=10**6, max_interval=10**6)):
        schedule.validate(total)

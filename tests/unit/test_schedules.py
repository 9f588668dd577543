"""Pipeline schedules as data, checked without any process."""
import pytest

from pipelines.strategies.pipeline_parallel import schedules
from pipelines.strategies.pipeline_parallel.schedules import BACKWARD, FORWARD, Action

SIZES = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 4, 8)]


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_every_schedule_is_complete_ordered_and_runs_without_deadlock(name, stages, microbatches):
    schedule = schedules.build(name, stages, microbatches)
    assert len(schedule) == stages
    schedules.validate(schedule, microbatches)
    slots = schedules.simulate(schedule)
    assert len(slots) == 2 * stages * microbatches
    end = {(s.stage, s.action): s.end for s in slots}
    start = {(s.stage, s.action): s.start for s in slots}
    for s in slots:  # the data each action needs was produced before it started
        i = s.action.microbatch
        if s.action.kind == FORWARD and s.stage > 0:
            assert start[(s.stage, s.action)] >= end[(s.stage - 1, s.action)]
        if s.action.kind == BACKWARD:
            assert start[(s.stage, s.action)] >= end[(s.stage, Action(FORWARD, i))]
            if s.stage < stages - 1:
                assert start[(s.stage, s.action)] >= end[(s.stage + 1, s.action)]


@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_1f1b_holds_at_most_p_microbatches_where_gpipe_holds_m(stages, microbatches):
    gpipe = schedules.gpipe(stages, microbatches)
    one_f_one_b = schedules.one_f_one_b(stages, microbatches)
    for stage in range(stages):
        assert schedules.peak_activations(gpipe[stage]) == microbatches
        assert schedules.peak_activations(one_f_one_b[stage]) == min(stages - stage, microbatches)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("stages, microbatches", [(2, 4), (3, 4), (4, 8)])
def test_bubble_with_equal_costs_is_the_textbook_one(name, stages, microbatches):
    slots = schedules.simulate(schedules.build(name, stages, microbatches), 1.0, 1.0)
    expected = schedules.theoretical_bubble(stages, microbatches)
    for fraction in schedules.bubble_fraction(slots, stages):
        assert fraction == pytest.approx(expected)


def test_a_schedule_that_waits_on_itself_is_refused():
    # Stage 1 wants micro-batch 1's forward before 0's backward could ever come back to it.
    broken = [[Action(FORWARD, 0), Action(BACKWARD, 0)],
              [Action(BACKWARD, 0), Action(FORWARD, 0)]]
    with pytest.raises(ValueError, match="before its forward"):
        schedules.validate(broken, 1)
    with pytest.raises(ValueError, match="deadlocks"):
        schedules.simulate(broken)


def test_unknown_schedule_and_bad_sizes_name_the_problem():
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        schedules.build("zigzag", 2, 4)
    with pytest.raises(ValueError, match="microbatches >= 1"):
        schedules.gpipe(2, 0)


def test_render_draws_one_row_per_stage():
    slots = schedules.simulate(schedules.one_f_one_b(2, 4), 1.0, 1.0)
    text = schedules.render(slots, 2)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].split()[1:3] == ["F0", "F1"]
    assert lines[2].split()[1:3] == [".", "F0"]

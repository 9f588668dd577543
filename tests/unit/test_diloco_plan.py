"""diloco's round plan (`plan.run_rounds`): which steps each synchronisation covers."""
import pytest

from pipelines.strategies.diloco.plan import epochs_per_round, run_rounds


def steps_of(plan):
    return [(e, s) for segments in plan for e, a, b in segments for s in range(a, b)]


@pytest.mark.parametrize("epochs,steps,sync_every", [(3, 20, 16), (3, 20, 20), (10, 20, 64), (10, 20, 256),
                                                     (7, 5, 11), (2, 4, 1), (1, 3, 100)])
def test_every_step_is_taken_once_in_order_and_rounds_are_even(epochs, steps, sync_every):
    plan = run_rounds(epochs, steps, sync_every)
    assert steps_of(plan) == [(e, s) for e in range(epochs) for s in range(steps)]
    lengths = [sum(b - a for _, a, b in segments) for segments in plan]
    assert max(lengths) - min(lengths) <= max(steps if sync_every > steps else 1, 1)
    if sync_every <= steps:  # every epoch ends synchronised: no round crosses an epoch
        assert all(len(segments) == 1 for segments in plan) and len(plan) == epochs * -(-steps // sync_every)
    else:  # whole epochs, the nearest number to H steps, cut evenly
        span = epochs_per_round(steps, sync_every)
        assert span == max(1, round(sync_every / steps))
        assert all(a == 0 and b == steps for segments in plan for _, a, b in segments)
        assert len(plan) == -(-epochs // span)


def test_a_resumed_run_takes_the_rest_of_the_uninterrupted_plan():
    whole = run_rounds(10, 20, 64)
    assert [s[0][0] for s in whole] == [0, 2, 5, 8]
    assert run_rounds(10, 20, 64, first_epoch=5) == whole[2:]
    # a checkpoint inside a round (one saved under another H): the rest of that round first
    assert run_rounds(10, 20, 64, first_epoch=3) == [[(3, 0, 20), (4, 0, 20)], *whole[2:]]
    assert run_rounds(10, 20, 64, first_epoch=10) == []

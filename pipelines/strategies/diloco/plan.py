"""Which inner steps each `diloco` round takes: the run's epochs cut into synchronisations.

H steps (`strategy.sync_every`) up to an epoch's S: every epoch is cut into ceil(S / H)
rounds of equal length within one step, and every epoch ends synchronised. A short last
round would take a full outer step, momentum and all, for a fraction of the work (measured:
H = 16 over 20 steps an epoch, rounds of 16 and 4 left an MLP 4 points lower than rounds of
10 and 10, one run each).

H longer than an epoch: rounds span whole epochs, round(H / S) of them, again cut into
rounds of equal length within one epoch; the epochs inside a round end unsynchronised (no
global model exists there to validate or checkpoint). This is what lets DiLoCo's ratio of
bytes reach the hundreds on a data set whose epoch is a few dozen steps.
"""
from __future__ import annotations

Segment = tuple[int, int, int]
"""(epoch, start, stop): steps [start, stop) of that epoch's batch plan."""


def epoch_rounds(steps: int, sync_every: int) -> list[tuple[int, int]]:
    """An epoch's steps [0, steps) cut into ceil(steps / sync_every) rounds of equal
    length within one step, as (start, stop)."""
    count = -(-steps // sync_every)
    edges = [round(i * steps / count) for i in range(count + 1)] if count else [0]
    return list(zip(edges[:-1], edges[1:]))


def epochs_per_round(steps: int, sync_every: int) -> int:
    """Whole epochs a round spans: 1 while H fits in an epoch, else the nearest whole
    number of epochs to H steps."""
    return 1 if sync_every <= steps or steps == 0 else max(1, round(sync_every / steps))


def run_rounds(epochs: int, steps: int, sync_every: int, first_epoch: int = 0) -> list[list[Segment]]:
    """The run's epochs as rounds, each a list of segments in step order, from
    `first_epoch` on: a resumed run goes on with the uninterrupted run's plan (checkpoints
    exist where rounds end; one made under another H starts a shorter first round)."""
    span = epochs_per_round(steps, sync_every)
    if span == 1:
        plan = [[(epoch, start, stop)] for epoch in range(epochs) for start, stop in epoch_rounds(steps, sync_every)]
    else:
        count = -(-epochs // span)
        edges = [round(i * epochs / count) for i in range(count + 1)] if count else []
        plan = [[(epoch, 0, steps) for epoch in range(a, b)] for a, b in zip(edges[:-1], edges[1:])]
    kept = [[s for s in segments if s[0] >= first_epoch] for segments in plan]
    return [segments for segments in kept if segments]

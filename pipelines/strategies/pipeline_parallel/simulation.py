"""A schedule played out before any process starts: when each action would run, the bubble
and the peak of live activations, and the schedule drawn as a grid.

`simulate` runs every actor's actions in order, each as soon as its input has arrived (a
model stage forwards micro-batch i after the stage before it did; it runs the backward of i
after the stage after it did), with given action costs and free communication.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.strategies.pipeline_parallel.actions import (
    BACKWARD,
    FORWARD,
    V_SHAPE,
    WEIGHT,
    Action,
    chunks,
    placement_of,
    splits,
    stage_of,
)


def peak_activations(actions: list[Action]) -> int:
    """Most micro-batches whose activations one actor holds at once (per chunk: a chunk's
    count as one each): forwarded and not yet backwarded (in a split schedule: not yet
    through W, which needs them too)."""
    release = WEIGHT if any(a.kind == WEIGHT for a in actions) else BACKWARD
    live = peak = 0
    for action in actions:
        live += 1 if action.kind == FORWARD else -1 if action.kind == release else 0
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class Slot:
    stage: int
    """The actor."""
    action: Action
    start: float
    end: float


def simulate(schedule, forward_cost: float = 1.0, backward_cost: float = 2.0) -> list[Slot]:
    """When each action would run if every actor ran its actions in order, as soon as their
    inputs arrived, with the given costs (communication free; a split backward's B and W
    each half of `backward_cost`). Raises on a deadlock."""
    actors, placement = len(schedule), placement_of(schedule)
    split, v = splits(schedule), chunks(schedule)
    cost = {FORWARD: forward_cost, BACKWARD: backward_cost / 2 if split else backward_cost,
            WEIGHT: backward_cost / 2}
    done: dict[tuple[int, str, int], float] = {}
    """(model stage, kind, micro-batch) -> when it ended."""
    cursor = [0] * actors
    clock = [0.0] * actors
    slots: list[Slot] = []
    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for actor in range(actors):
            # an actor runs on as far as its inputs allow (a V's last actor feeds itself)
            while cursor[actor] < len(schedule[actor]):
                action = schedule[actor][cursor[actor]]
                here = stage_of(actor, action.chunk, actors, placement)
                needs = _dependency(here, action, actors * v)
                if needs is not None and needs not in done:
                    break
                start = max(clock[actor], done[needs] if needs is not None else 0.0)
                done[(here, action.kind, action.microbatch)] = clock[actor] = start + cost[action.kind]
                slots.append(Slot(actor, action, start, clock[actor]))
                cursor[actor] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            waiting = {s: str(schedule[s][cursor[s]]) for s in range(actors) if cursor[s] < len(schedule[s])}
            raise ValueError(f"schedule deadlocks: stages wait forever on {waiting}")
    return slots


def _dependency(stage: int, action: Action, stages: int):
    """What `action` of model stage `stage` (of `stages` in all) waits for, as `done` keys."""
    i = action.microbatch
    if action.kind == WEIGHT:  # the stage's own input gradient came first
        return (stage, BACKWARD, i)
    if action.kind == FORWARD:
        return (stage - 1, FORWARD, i) if stage > 0 else None
    if stage == stages - 1:
        return (stage, FORWARD, i)
    return (stage + 1, BACKWARD, i)


def bubble_fraction(slots: list[Slot], stages: int) -> list[float]:
    """Per actor, idle time over the makespan."""
    makespan = max(s.end for s in slots)
    busy = [0.0] * stages
    for s in slots:
        busy[s.stage] += s.end - s.start
    return [1 - b / makespan for b in busy]


def theoretical_bubble(stages: int, microbatches: int, virtual: int = 1) -> float:
    """(P-1)/(vM + P-1): GPipe's and 1F1B's with v = 1; interleaving's fills v times faster."""
    return (stages - 1) / (virtual * microbatches + stages - 1)


def expected_bubble(schedule, microbatches: int) -> float:
    """The bubble a schedule should have: (P-1)/(vM + P-1) for GPipe, 1F1B and interleaving;
    a V's (ZB-V has no closed form) simulated with F = B = W, as the paper has it, a chunk's
    costs 1/v of a stage's, mean over the actors."""
    stages, v = len(schedule), chunks(schedule)
    if placement_of(schedule) != V_SHAPE:
        return theoretical_bubble(stages, microbatches, v)
    return sum(bubble_fraction(simulate(schedule, 1.0 / v, 2.0 / v), stages)) / stages


def render(slots: list[Slot], stages: int, unit: float = 1.0) -> str:
    """The schedule as a text grid: one row per actor, one column per `unit` of time."""
    width = int(round(max(s.end for s in slots) / unit))
    rows = [["  . "] * width for _ in range(stages)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    interleaved = any(s.action.chunk for s in slots)
    for s in slots:
        label = str(s.action) + (letters[s.action.chunk] if interleaved else "")
        for t in range(int(round(s.start / unit)), int(round(s.end / unit))):
            rows[s.stage][t] = f"{label:>4}"
    header = "stage " + "".join(f"{t:>4}" for t in range(width))
    return "\n".join([header] + [f"{k:>5} " + "".join(row) for k, row in enumerate(rows)])

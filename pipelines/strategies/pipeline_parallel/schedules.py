"""Pipeline schedules as data: per stage, the ordered forward/backward actions on micro-batches.

A schedule says only what each stage does and in which order; one executor can run any of
them. `simulate` plays a schedule out with given action costs, respecting the data
dependencies between stages (a stage forwards micro-batch i after the stage before it did;
it runs the backward of i after the stage after it did), so a schedule's makespan, bubble
and peak of live activations are known before any process starts, and `render` draws it.
"""
from __future__ import annotations

from dataclasses import dataclass

FORWARD, BACKWARD = "F", "B"


@dataclass(frozen=True)
class Action:
    kind: str
    """`F` (forward) or `B` (backward)."""
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


Schedule = list[list[Action]]
"""Index s holds stage s's actions in execution order."""


def gpipe(stages: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards (GPipe): every stage holds M micro-batches' activations."""
    _check_sizes(stages, microbatches)
    one = [Action(FORWARD, i) for i in range(microbatches)] + \
          [Action(BACKWARD, i) for i in range(microbatches)]
    return [list(one) for _ in range(stages)]


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): after a warm-up of P-1-s forwards, stage s alternates one
    forward and one backward, so it never holds more than P - s micro-batches' activations."""
    _check_sizes(stages, microbatches)
    schedule = []
    for stage in range(stages):
        warmup = min(stages - 1 - stage, microbatches)
        actions = [Action(FORWARD, i) for i in range(warmup)]
        for j in range(microbatches - warmup):
            actions += [Action(FORWARD, warmup + j), Action(BACKWARD, j)]
        actions += [Action(BACKWARD, i) for i in range(microbatches - warmup, microbatches)]
        schedule.append(actions)
    return schedule


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build(name: str, stages: int, microbatches: int) -> Schedule:
    try:
        return SCHEDULES[name](stages, microbatches)
    except KeyError:
        raise ValueError(f"unknown schedule {name!r} (known: {', '.join(SCHEDULES)})") from None


def validate(schedule: Schedule, microbatches: int) -> None:
    """Every stage forwards and backwards each micro-batch exactly once, forward first."""
    for stage, actions in enumerate(schedule):
        for kind in (FORWARD, BACKWARD):
            seen = sorted(a.microbatch for a in actions if a.kind == kind)
            if seen != list(range(microbatches)):
                raise ValueError(f"stage {stage}: {kind} of micro-batches {seen}, want 0..{microbatches - 1}")
        position = {a: i for i, a in enumerate(actions)}
        for i in range(microbatches):
            if position[Action(BACKWARD, i)] < position[Action(FORWARD, i)]:
                raise ValueError(f"stage {stage}: backward of micro-batch {i} before its forward")


def peak_activations(actions: list[Action]) -> int:
    """Most micro-batches forwarded but not yet backwarded at once on one stage."""
    live = peak = 0
    for action in actions:
        live += 1 if action.kind == FORWARD else -1
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class Slot:
    stage: int
    action: Action
    start: float
    end: float


def simulate(schedule: Schedule, forward_cost: float = 1.0, backward_cost: float = 2.0) -> list[Slot]:
    """When each action would run if every stage ran its actions in order, as soon as their
    inputs arrived, with the given costs (communication free). Raises on a deadlock."""
    stages = len(schedule)
    done: dict[tuple[int, Action], float] = {}
    cursor = [0] * stages
    clock = [0.0] * stages
    slots: list[Slot] = []
    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for stage in range(stages):
            if cursor[stage] == len(schedule[stage]):
                continue
            action = schedule[stage][cursor[stage]]
            needs = _dependency(stage, action, stages)
            if needs is not None and needs not in done:
                continue
            ready = done[needs] if needs is not None else 0.0
            start = max(clock[stage], ready)
            end = start + (forward_cost if action.kind == FORWARD else backward_cost)
            done[(stage, action)] = clock[stage] = end
            slots.append(Slot(stage, action, start, end))
            cursor[stage] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            waiting = {s: str(schedule[s][cursor[s]]) for s in range(stages) if cursor[s] < len(schedule[s])}
            raise ValueError(f"schedule deadlocks: stages wait forever on {waiting}")
    return slots


def _dependency(stage: int, action: Action, stages: int):
    if action.kind == FORWARD:
        return (stage - 1, action) if stage > 0 else None
    if stage == stages - 1:
        return (stage, Action(FORWARD, action.microbatch))
    return (stage + 1, action)


def bubble_fraction(slots: list[Slot], stages: int) -> list[float]:
    """Per stage, idle time over the makespan."""
    makespan = max(s.end for s in slots)
    busy = [0.0] * stages
    for s in slots:
        busy[s.stage] += s.end - s.start
    return [1 - b / makespan for b in busy]


def theoretical_bubble(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


def render(slots: list[Slot], stages: int, unit: float = 1.0) -> str:
    """The schedule as a text grid: one row per stage, one column per `unit` of time."""
    width = int(round(max(s.end for s in slots) / unit))
    rows = [["  . "] * width for _ in range(stages)]
    for s in slots:
        for t in range(int(round(s.start / unit)), int(round(s.end / unit))):
            rows[s.stage][t] = f"{str(s.action):>4}"
    header = "stage " + "".join(f"{t:>4}" for t in range(width))
    return "\n".join([header] + [f"{k:>5} " + "".join(row) for k, row in enumerate(rows)])


def _check_sizes(stages: int, microbatches: int) -> None:
    if stages < 1 or microbatches < 1:
        raise ValueError(f"a schedule needs stages >= 1 and microbatches >= 1, got {stages} and {microbatches}")

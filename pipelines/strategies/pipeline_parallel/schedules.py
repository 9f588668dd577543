"""Pipeline schedules as data: per stage, the ordered forward/backward actions on micro-batches.

A backward may come whole (`B`) or split in two (Qi et al., "Zero Bubble Pipeline
Parallelism", 2023): `B` the gradient of the stage's input, sent upstream at once because
the stage before waits for it, and `W` the gradient of the stage's weights, which nobody
waits for and which a schedule may defer into what would be idle time. A schedule with
`W` actions splits every backward of every stage.

With interleaving (Narayanan et al. 2021) each actor holds v chunks of the model, not
one: the model is cut into P x v stages and actor a holds stages a, a + P, a + 2P, ...,
so a micro-batch passes every actor v times and the pipeline fills v times faster. An
action then names its chunk; a schedule is still one list of actions per actor.

A schedule says only what each actor does and in which order; one executor can run any of
them. `simulate` plays a schedule out with given action costs, respecting the data
dependencies between stages (a stage forwards micro-batch i after the stage before it did;
it runs the backward of i after the stage after it did), so a schedule's makespan, bubble
and peak of live activations are known before any process starts, and `render` draws it.
"""
from __future__ import annotations

from dataclasses import dataclass

FORWARD, BACKWARD, WEIGHT = "F", "B", "W"
NAMES = {FORWARD: "forward", BACKWARD: "backward", WEIGHT: "weight gradient"}


@dataclass(frozen=True)
class Action:
    kind: str
    """`F` (forward), `B` (backward: whole, or the input's gradient where the schedule has
    `W`s) or `W` (the weights' gradient)."""
    microbatch: int
    chunk: int = 0
    """Which of the actor's chunks (0 without interleaving): chunk c of actor a is stage c*P + a."""

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


Schedule = list[list[Action]]
"""Index a holds actor a's actions in execution order."""


def chunks(schedule: Schedule) -> int:
    """The chunks v each actor holds (1 without interleaving)."""
    return 1 + max((a.chunk for actions in schedule for a in actions), default=0)


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


def zb_h1(stages: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023) within 1F1B's memory: each backward split into B and W, laid
    out by playing the pipeline forward in unit steps, each stage taking, when free, the
    first of: a B whose gradient has arrived (it is on the critical path back through the
    stages), the next F while it holds fewer than P - s micro-batches (1F1B's cap; here a
    micro-batch is held from its F to its W, which needs its activations), else a pending W
    (nobody waits for it). Where 1F1B's stages wait in the cool-down for a fused backward
    downstream, these wait for a B alone and fill the rest with Ws: 30 steps instead of 33 at
    P=4, M=8 with F = B = W (the paper's ZB-H1, which frees most of a micro-batch at B, 27)."""
    _check_sizes(stages, microbatches)
    finished: dict[tuple[int, str, int], int] = {}
    schedule: Schedule = [[] for _ in range(stages)]
    next_f, next_b, held = [0] * stages, [0] * stages, [0] * stages
    pending: list[list[int]] = [[] for _ in range(stages)]

    def arrived(key, now: int) -> bool:
        return finished.get(key, now + 1) <= now

    now = 0
    while sum(map(len, schedule)) < 3 * stages * microbatches:
        for stage in range(stages):
            if schedule[stage] and finished[(stage, *_last(schedule[stage]))] > now:
                continue  # busy
            i, j = next_b[stage], next_f[stage]
            if i < microbatches and arrived((stage, FORWARD, i), now) and (
                    stage == stages - 1 or arrived((stage + 1, BACKWARD, i), now)):
                action, next_b[stage] = Action(BACKWARD, i), i + 1
                pending[stage].append(i)
            elif j < microbatches and held[stage] < stages - stage and (
                    stage == 0 or arrived((stage - 1, FORWARD, j), now)):
                action, next_f[stage] = Action(FORWARD, j), j + 1
                held[stage] += 1
            elif pending[stage]:
                action = Action(WEIGHT, pending[stage].pop(0))
                held[stage] -= 1
            else:
                continue
            finished[(stage, action.kind, action.microbatch)] = now + 1
            schedule[stage].append(action)
        now += 1
    return schedule


def _last(actions: list[Action]) -> tuple[str, int]:
    return actions[-1].kind, actions[-1].microbatch


def interleaved_1f1b(stages: int, microbatches: int, virtual: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM's order): each of the P actors
    holds v chunks; micro-batches go through in groups of P, a group's forwards chunk by
    chunk (chunk 0 of micro-batches 0..P-1, then chunk 1 of the same, ...), backwards in the
    reverse order of chunks. Actor a warms up with (P - a - 1) x 2 + (v - 1) x P forwards,
    then alternates one forward and one backward, then cools down: bubble (P-1)/(vM + P-1),
    v times smaller than 1F1B's, for v times the point-to-point messages. M must be a
    multiple of P (the groups)."""
    _check_sizes(stages, microbatches)
    if virtual < 1:
        raise ValueError(f"interleaving needs strategy.virtual_stages >= 1, got {virtual}")
    if microbatches % stages:
        raise ValueError(f"interleaved-1f1b goes through micro-batches in groups of the {stages} stages: "
                         f"strategy.microbatches ({microbatches}) must be a multiple of {stages}")
    total = microbatches * virtual

    def forward(k: int) -> Action:
        group, within = divmod(k, stages * virtual)
        return Action(FORWARD, group * stages + within % stages, within // stages)

    def backward(k: int) -> Action:
        group, within = divmod(k, stages * virtual)
        return Action(BACKWARD, group * stages + within % stages, virtual - 1 - within // stages)

    schedule = []
    for actor in range(stages):
        warmup = min((stages - actor - 1) * 2 + (virtual - 1) * stages, total)
        actions = [forward(k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [forward(warmup + k), backward(k)]
        actions += [backward(k) for k in range(total - warmup, total)]
        schedule.append(actions)
    return schedule


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1, "interleaved-1f1b": interleaved_1f1b}
INTERLEAVED = ("interleaved-1f1b",)
"""The schedules whose actors hold `strategy.virtual_stages` chunks each; the others hold one."""


def build(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The named schedule, or one written out as `to_text` writes it (a schedule saved to a
    file and given as `strategy.schedule`), checked against the stages, micro-batches and
    chunks per actor (`virtual`)."""
    if name in SCHEDULES:
        if name in INTERLEAVED:
            if virtual < 2:  # one chunk per actor would be 1F1B, and say nothing
                raise ValueError(f"{name} gives each stage several chunks of the model: set "
                                 f"strategy.virtual_stages (--virtual-stages) >= 2, got {virtual}")
            return SCHEDULES[name](stages, microbatches, virtual)
        if virtual != 1:
            raise ValueError(f"{name} holds one chunk per actor: strategy.virtual_stages {virtual} needs "
                             f"schedule {' or '.join(INTERLEAVED)} (or a schedule's text with {virtual} chunks)")
        return SCHEDULES[name](stages, microbatches)
    if not any(c.isdigit() for c in name):
        raise ValueError(f"unknown schedule {name!r} (known: {', '.join(SCHEDULES)}, or a schedule's "
                         "text: one line of actions per stage, as 0F0 0F1 0B0 ...)")
    plan = from_text(name)
    if len(plan) != stages:
        raise ValueError(f"the schedule's text has {len(plan)} stage line(s), the run has {stages} stages")
    if chunks(plan) != virtual:
        raise ValueError(f"the schedule's text holds {chunks(plan)} chunk(s) per stage, the run has "
                         f"strategy.virtual_stages {virtual}")
    validate(plan, microbatches)
    simulate(plan)  # raises on a deadlock
    return plan


def splits(schedule: Schedule) -> bool:
    """Whether the schedule splits its backwards into B and W."""
    return any(a.kind == WEIGHT for actions in schedule for a in actions)


def validate(schedule: Schedule, microbatches: int) -> None:
    """Every stage (every chunk of every actor) forwards and backwards each micro-batch
    exactly once (and, in a split schedule, takes its weight gradient once), in the order
    F, B, W."""
    kinds = (FORWARD, BACKWARD, WEIGHT) if splits(schedule) else (FORWARD, BACKWARD)
    v = chunks(schedule)
    for stage, actions in enumerate(schedule):
        position = {a: i for i, a in enumerate(actions)}
        for chunk in range(v):
            where = f"stage {stage}" + (f" chunk {chunk}" if v > 1 else "")
            for kind in kinds:
                seen = sorted(a.microbatch for a in actions if a.kind == kind and a.chunk == chunk)
                if seen != list(range(microbatches)):
                    raise ValueError(f"{where}: {kind} of micro-batches {seen}, want 0..{microbatches - 1}")
            for i in range(microbatches):
                for before, after in zip(kinds, kinds[1:]):
                    if position[Action(after, i, chunk)] < position[Action(before, i, chunk)]:
                        raise ValueError(f"{where}: {NAMES[after]} of micro-batch {i} before its {NAMES[before]}")
        if len(actions) != len(kinds) * microbatches * v:
            raise ValueError(f"stage {stage}: {len(actions)} actions, want {len(kinds) * microbatches * v}")


def peak_activations(actions: list[Action]) -> int:
    """Most micro-batches whose activations one stage holds at once: forwarded and not yet
    backwarded (in a split schedule: not yet through W, which needs them too)."""
    release = WEIGHT if any(a.kind == WEIGHT for a in actions) else BACKWARD
    live = peak = 0
    for action in actions:
        live += 1 if action.kind == FORWARD else -1 if action.kind == release else 0
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
    inputs arrived, with the given costs (communication free; a split backward's B and W
    each half of `backward_cost`). Raises on a deadlock."""
    stages = len(schedule)
    split, v = splits(schedule), chunks(schedule)
    cost = {FORWARD: forward_cost, BACKWARD: backward_cost / 2 if split else backward_cost,
            WEIGHT: backward_cost / 2}
    done: dict[tuple[int, str, int], float] = {}
    """(model stage c*P + a, kind, micro-batch) -> when it ended."""
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
            needs = _dependency(action.chunk * stages + stage, action, stages * v)
            if needs is not None and needs not in done:
                continue
            ready = done[needs] if needs is not None else 0.0
            start = max(clock[stage], ready)
            end = start + cost[action.kind]
            done[(action.chunk * stages + stage, action.kind, action.microbatch)] = clock[stage] = end
            slots.append(Slot(stage, action, start, end))
            cursor[stage] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            waiting = {s: str(schedule[s][cursor[s]]) for s in range(stages) if cursor[s] < len(schedule[s])}
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
    """Per stage, idle time over the makespan."""
    makespan = max(s.end for s in slots)
    busy = [0.0] * stages
    for s in slots:
        busy[s.stage] += s.end - s.start
    return [1 - b / makespan for b in busy]


def theoretical_bubble(stages: int, microbatches: int, virtual: int = 1) -> float:
    """(P-1)/(vM + P-1): GPipe's and 1F1B's with v = 1; interleaving's fills v times faster."""
    return (stages - 1) / (virtual * microbatches + stages - 1)


def render(slots: list[Slot], stages: int, unit: float = 1.0) -> str:
    """The schedule as a text grid: one row per stage, one column per `unit` of time."""
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


def to_text(schedule: Schedule) -> str:
    """One line per actor of actions as torch.distributed.pipelining writes them: "1W3" is
    model stage 1's weight gradient of micro-batch 3; with interleaving, actor a's chunk c
    is model stage c*P + a ("3F0" on line 1 of a 2-actor schedule: chunk 1's forward)."""
    p = len(schedule)
    return "\n".join(" ".join(f"{a.chunk * p + actor}{a}" for a in actions)
                     for actor, actions in enumerate(schedule))


def from_text(text: str) -> Schedule:
    """The schedule `to_text` wrote (blank lines and `#` comments ignored); one line per actor."""
    import re

    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    p = len(lines)
    schedule: Schedule = []
    for number, line in enumerate(lines):
        actions = []
        for token in line.split():
            found = re.fullmatch(r"(\d+)([FBW])(\d+)", token)
            if not found:
                raise ValueError(f"schedule line {number + 1}: {token!r} is not an action like 0F1, 1B0 or 2W3")
            stage = int(found.group(1))
            if stage % p != number or (p == 1 and stage != 0):
                raise ValueError(f"schedule line {number + 1}: {token!r} names stage {stage}, but line "
                                 f"{number + 1} holds stage {number}'s actions"
                                 + (f" (and its chunks', stages {number} + k x {p})" if p > 1 else ""))
            actions.append(Action(found.group(2), int(found.group(3)), stage // p))
        schedule.append(actions)
    return schedule


def _check_sizes(stages: int, microbatches: int) -> None:
    if stages < 1 or microbatches < 1:
        raise ValueError(f"a schedule needs stages >= 1 and microbatches >= 1, got {stages} and {microbatches}")

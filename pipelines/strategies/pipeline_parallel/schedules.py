"""Pipeline schedules as data: per stage, the ordered forward/backward actions on micro-batches.

A backward may come whole (`B`) or split in two (Qi et al., "Zero Bubble Pipeline
Parallelism", 2023): `B` the gradient of the stage's input, sent upstream at once because
the stage before waits for it, and `W` the gradient of the stage's weights, which nobody
waits for and which a schedule may defer into what would be idle time. A schedule with
`W` actions splits every backward of every stage.

With interleaving (Narayanan et al. 2021) each actor holds v chunks of the model, not
one: the model is cut into P x v stages and actor a holds stages a, a + P, a + 2P, ...,
so a micro-batch passes every actor v times and the pipeline fills v times faster. ZB-V
(Qi et al.) holds two chunks per actor in a V (`actions.V_SHAPE`: stages a and 2P - 1 - a).
An action then names its chunk; a schedule is still one list of actions per actor.

A schedule says only what each actor does and in which order; one executor can run any of
them, and `simulation.simulate` plays it out before any process starts.
"""
from __future__ import annotations

from pipelines.strategies.pipeline_parallel.actions import (
    BACKWARD,
    FORWARD,
    NAMES,
    V_SHAPE,
    WEIGHT,
    Action,
    Schedule,
    chunks,
    from_text,
    splits,
)
from pipelines.strategies.pipeline_parallel.simulation import simulate


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


def zb_v(stages: int, microbatches: int) -> Schedule:
    """ZB-V (Qi et al. 2023, section 6; the order of torch's `ScheduleZBVZeroBubble`): two
    chunks per actor in a V, backwards split into B and W. Actor a warms up with 2(P - a) - 1
    forwards of chunk 0, then a pairs of chunk 1's and chunk 0's forwards, then P - a rounds of
    chunk 1's F, B, W; in the steady state each round is chunk 0's F, B, W and chunk 1's F, B,
    W; the cool-down runs the remaining Bs (both chunks, then chunk 0's with its Ws) and the
    deferred Ws last. With F = B = W its bubble is near zero at 1F1B's peak of activations
    (2P chunk-activations, each half a stage's). The order is laid out for at least 2P - 1
    micro-batches; with fewer, the actions of the ones that do not exist are left out."""
    _check_sizes(stages, microbatches)
    laid_out = max(2 * stages - 1, microbatches)
    return Schedule([[a for a in _zb_v_actor(actor, stages, laid_out) if a.microbatch < microbatches]
                     for actor in range(stages)], V_SHAPE)


def _zb_v_actor(actor: int, stages: int, microbatches: int) -> list[Action]:
    actions: list[Action] = []
    count = {(kind, chunk): 0 for kind in (FORWARD, BACKWARD, WEIGHT) for chunk in (0, 1)}

    def take(kind: str, chunk: int) -> None:
        actions.append(Action(kind, count[(kind, chunk)], chunk))
        count[(kind, chunk)] += 1

    for _ in range(2 * (stages - actor) - 1):
        take(FORWARD, 0)
    for _ in range(actor):
        take(FORWARD, 1)
        take(FORWARD, 0)
    for _ in range(stages - actor):
        for kind in (FORWARD, BACKWARD, WEIGHT):
            take(kind, 1)
    while count[(FORWARD, 1)] < count[(FORWARD, 0)] or count[(FORWARD, 0)] < microbatches:
        if count[(FORWARD, 0)] < microbatches:
            take(FORWARD, 0)
        take(BACKWARD, 0)
        take(WEIGHT, 0)
        for kind in (FORWARD, BACKWARD, WEIGHT):
            take(kind, 1)
    for _ in range(actor):
        take(BACKWARD, 0)
        take(BACKWARD, 1)
    for _ in range(stages - actor):
        take(BACKWARD, 0)
        take(WEIGHT, 0)
    for chunk in (1, 0):  # the Ws the cool-down deferred
        while count[(WEIGHT, chunk)] < count[(BACKWARD, chunk)]:
            take(WEIGHT, chunk)
    return actions


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1, "interleaved-1f1b": interleaved_1f1b,
             "zb-v": zb_v}
INTERLEAVED = ("interleaved-1f1b",)
"""The schedules whose actors hold `strategy.virtual_stages` chunks each."""
FIXED_CHUNKS = {"zb-v": 2}
"""The schedules whose actors hold a fixed number of chunks; the others hold one."""


def build(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The named schedule, or one written out as `to_text` writes it (a schedule saved to a
    file and given as `strategy.schedule`), checked against the stages, micro-batches and
    chunks per actor (`virtual`)."""
    if name in SCHEDULES:
        if name in FIXED_CHUNKS:
            if virtual != FIXED_CHUNKS[name]:
                raise ValueError(f"{name} gives each stage {FIXED_CHUNKS[name]} chunks of the model, in a V "
                                 f"(stage a holds model stages a and 2P-1-a): set strategy.virtual_stages "
                                 f"(--virtual-stages) to {FIXED_CHUNKS[name]}, got {virtual}")
            return SCHEDULES[name](stages, microbatches)
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


def _check_sizes(stages: int, microbatches: int) -> None:
    if stages < 1 or microbatches < 1:
        raise ValueError(f"a schedule needs stages >= 1 and microbatches >= 1, got {stages} and {microbatches}")

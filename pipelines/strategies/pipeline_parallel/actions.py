"""A pipeline schedule's vocabulary: actions, which actor holds which model stage, and the
schedule as text.

An action is a forward (`F`), a backward (`B`) or, where a schedule splits backwards, a
weight gradient (`W`) of one micro-batch on one of the actor's chunks. With v chunks per
actor the model is cut into P x v stages, and a placement says which actor holds which:
`loop` (Narayanan et al. 2021's interleaving: actor a holds stages a, a + P, a + 2P, ...,
each chunk a pass down the actors) or `v` (Qi et al. 2023's ZB-V: chunk 0 runs down the
actors and chunk 1 back up, so actor a holds stages a and 2P - 1 - a; the model's first and
last stages sit on actor 0, and actor P - 1 hands its chunk 0's output to its own chunk 1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FORWARD, BACKWARD, WEIGHT = "F", "B", "W"
NAMES = {FORWARD: "forward", BACKWARD: "backward", WEIGHT: "weight gradient"}
LOOP, V_SHAPE = "loop", "v"


@dataclass(frozen=True)
class Action:
    kind: str
    """`F` (forward), `B` (backward: whole, or the input's gradient where the schedule has
    `W`s) or `W` (the weights' gradient)."""
    microbatch: int
    chunk: int = 0
    """Which of the actor's chunks (0 without interleaving); the schedule's placement says
    which model stage it is (`stage_of`)."""

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


class Schedule(list):
    """Index a holds actor a's actions in execution order; `placement` (`loop` or `v`) maps
    an actor's chunks to model stages."""

    def __init__(self, actions=(), placement: str = LOOP):
        super().__init__(actions)
        self.placement = placement

    def __eq__(self, other) -> bool:
        if not isinstance(other, list):
            return NotImplemented
        return list.__eq__(self, other) and getattr(other, "placement", LOOP) == self.placement

    __hash__ = None


def stage_of(actor: int, chunk: int, actors: int, placement: str = LOOP) -> int:
    """The model stage that `actor`'s `chunk` is, of `actors` actors."""
    if placement == V_SHAPE and chunk % 2:
        return chunk * actors + actors - 1 - actor
    return chunk * actors + actor


def holder(stage: int, actors: int, placement: str = LOOP) -> tuple[int, int]:
    """(actor, chunk) holding model stage `stage`: `stage_of`'s inverse."""
    chunk, offset = divmod(stage, actors)
    return (actors - 1 - offset if placement == V_SHAPE and chunk % 2 else offset), chunk


def placement_of(schedule) -> str:
    return getattr(schedule, "placement", LOOP)


def chunks(schedule) -> int:
    """The chunks v each actor holds (1 without interleaving)."""
    return 1 + max((a.chunk for actions in schedule for a in actions), default=0)


def splits(schedule) -> bool:
    """Whether the schedule splits its backwards into B and W."""
    return any(a.kind == WEIGHT for actions in schedule for a in actions)


def to_text(schedule) -> str:
    """One line per actor of actions as torch.distributed.pipelining writes them: "1W3" is
    model stage 1's weight gradient of micro-batch 3; with several chunks per actor, the
    model stage its chunk is ("3F0" on line 1 of a 2-actor loop schedule: chunk 1's forward;
    on line 0 of a V schedule, the same)."""
    p, placement = len(schedule), placement_of(schedule)
    return "\n".join(" ".join(f"{stage_of(actor, a.chunk, p, placement)}{a}" for a in actions)
                     for actor, actions in enumerate(schedule))


def from_text(text: str) -> Schedule:
    """The schedule `to_text` wrote (blank lines and `#` comments ignored); one line per
    actor, its placement read from the stages each line names."""
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    p = len(lines)
    parsed = []
    for number, line in enumerate(lines):
        tokens = []
        for token in line.split():
            found = re.fullmatch(r"(\d+)([FBW])(\d+)", token)
            if not found:
                raise ValueError(f"schedule line {number + 1}: {token!r} is not an action like 0F1, 1B0 or 2W3")
            tokens.append((token, int(found.group(1)), found.group(2), int(found.group(3))))
        parsed.append(tokens)
    fits = {placement: all(holder(stage, p, placement)[0] == number for number, tokens in enumerate(parsed)
                           for _, stage, _, _ in tokens) for placement in (LOOP, V_SHAPE)}
    placement = LOOP if fits[LOOP] or not fits[V_SHAPE] else V_SHAPE
    for number, tokens in enumerate(parsed):
        for token, stage, _, _ in tokens:
            if holder(stage, p, placement)[0] != number or (p == 1 and stage != 0):
                raise ValueError(f"schedule line {number + 1}: {token!r} names stage {stage}, but line "
                                 f"{number + 1} holds stage {number}'s actions"
                                 + (f" (and its chunks': stages {_held(number, p, LOOP)} in a loop, or "
                                    f"{_held(number, p, V_SHAPE)} in a V)" if p > 1 else ""))
    return Schedule([[Action(kind, micro, holder(stage, p, placement)[1]) for _, stage, kind, micro in tokens]
                     for tokens in parsed], placement)


def _held(actor: int, actors: int, placement: str) -> str:
    return ", ".join(str(stage_of(actor, c, actors, placement)) for c in range(4)) + ", ..."

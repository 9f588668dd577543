"""`pipeline`: pipeline model parallelism over Ray actors (GPipe, 1F1B, interleaved 1F1B, ZB-H1).

The model is cut into P stages balanced by measured cost (`cut`); each stage is
an actor (`stage`) holding its layers and optimizer, and R replicas of the whole
pipeline train on disjoint shards of every mini-batch, allreducing each stage's gradients
(2-D parallelism). Stages exchange activations and gradients with torch.distributed
point-to-point; the driver asks all stages for one epoch at a time, then evaluates the
assembled model, logs, and checkpoints. A stage that dies restarts every stage from the
last checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from pipelines.config import ConfigError, RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.registry import register
from pipelines.strategies.base import FitResult, Strategy, require
from pipelines.strategies.pipeline_parallel.actions import V_SHAPE, placement_of, splits
from pipelines.strategies.pipeline_parallel.cut import CannotCut, check
from pipelines.strategies.pipeline_parallel.driver import PipelineRun
from pipelines.strategies.pipeline_parallel.schedules import SCHEDULES, build
from pipelines.strategies.pipeline_parallel.simulation import (
    bubble_fraction,
    expected_bubble,
    peak_activations,
    render,
    simulate,
    theoretical_bubble,
)
from pipelines.training import placement
from pipelines.training.placement import worker_bundle


@dataclass
class PipelineOptions:
    stages: int = 2
    """Pipeline stages P (`--stages`), one actor each."""
    microbatches: int = 4
    """Micro-batches M per mini-batch (`--microbatches`)."""
    schedule: str = "1f1b"
    """gpipe, 1f1b, interleaved-1f1b, zb-h1 or zb-v (`--schedule`): interleaved-1f1b gives each
    stage `virtual_stages` chunks of the model; zb-h1 splits each backward into the input's
    gradient (B) and the weights' (W), deferring Ws into 1F1B's cool-down waits; zb-v splits
    them too, over two chunks per stage in a V (`--virtual-stages 2`). Or a
    schedule of your own as text, one line of actions per stage ("0F0 0F1 0B0 ..."; a
    saved file: `--set strategy.schedule="$(cat my_schedule.txt)"`), checked before Ray starts."""
    virtual_stages: int = 1
    """Chunks v per stage actor (`--virtual-stages`): the model is cut into P x v parts; for
    interleaved-1f1b actor s holds parts s, s + P, ... (bubble (P-1)/(vM + P-1)); zb-v takes
    2, actor s holding parts s and 2P - 1 - s."""
    replicas: int = 1
    """Pipelines R on disjoint data shards, allreducing per stage (`--replicas`)."""
    split: Optional[list[int]] = None
    """Block indices where stages 2..P start (default: balanced by measured cost)."""
    activation_checkpointing: bool = False
    """Keep only each stage's input and recompute its forward during backward."""
    max_failures: int = 3
    """Restarts of all stages from the last checkpoint before the run fails; -1: no limit."""


class PipelineStrategy(Strategy):
    name = "pipeline"
    streams = True
    options = PipelineOptions
    description = ("pipeline model parallelism: stages on actors, GPipe, 1F1B, interleaved 1F1B, ZB-H1 or ZB-V "
                   "(or a schedule of your own), x data replicas")

    def validate(self, run: RunConfig) -> None:
        o: PipelineOptions = run.strategy.options
        batch = run.data.batch_size
        checks = [
            (o.stages >= 1, f"strategy.stages must be >= 1, got {o.stages}"),
            (run.optim.accumulate == 1, "a pipeline step already accumulates its micro-batches: raise "
                                        "data.batch_size and --microbatches instead of optim.accumulate"),
            (run.optim.precision != "fp16", "pipeline stages would each scale their own part of one loss: "
                                            "optim.precision fp16 is refused under pipeline, use bf16"),
            (o.microbatches >= 1, f"strategy.microbatches must be >= 1, got {o.microbatches}"),
            (o.virtual_stages >= 1, f"strategy.virtual_stages must be >= 1, got {o.virtual_stages}"),
            (o.virtual_stages == 1 or o.stages >= 2,
             "strategy.virtual_stages > 1 interleaves chunks over several stage actors: it needs strategy.stages >= 2"),
            (o.replicas >= 1, f"strategy.replicas must be >= 1, got {o.replicas}"),
            (o.microbatches * o.replicas <= batch,
             f"strategy.microbatches x replicas ({o.microbatches} x {o.replicas}) exceeds "
             f"data.batch_size ({batch})"),
            (batch % max(o.microbatches * o.replicas, 1) == 0,
             f"data.batch_size ({batch}) must be divisible by microbatches x replicas "
             f"({o.microbatches} x {o.replicas}): micro-batches are equal shards of a mini-batch"),
            (o.max_failures >= -1, f"strategy.max_failures must be >= -1, got {o.max_failures}"),
        ]
        require(checks)
        if o.stages >= 1 and o.microbatches >= 1:
            try:  # a name, or a schedule written out as text (`schedules.to_text`)
                build(o.schedule, o.stages, o.microbatches, o.virtual_stages)
            except ValueError as e:
                raise ConfigError(f"strategy.schedule: {e}") from None

    def actor_bundles(self, run: RunConfig) -> list[dict[str, float]]:
        o: PipelineOptions = run.strategy.options
        return [worker_bundle(run)] * (o.stages * o.replicas)

    def describe(self, run: RunConfig) -> str:
        return schedule_grid(run)

    def check_model(self, run: RunConfig, model: nn.Module, data: Dataset) -> None:
        o: PipelineOptions = run.strategy.options
        try:
            check(model, run.model.name, o.stages * o.virtual_stages, o.split, o.virtual_stages)
        except CannotCut as e:
            raise ConfigError(str(e)) from None

    def fit(self, run: RunConfig, data: Dataset, context: RunContext) -> FitResult:
        o: PipelineOptions = run.strategy.options
        labels = [f"stage-{s}-replica-{k}" for k in range(o.replicas) for s in range(o.stages)]
        with placement.reserve(self, run, context.say, labels) as place:
            context.tracker.startup("placement")
            return PipelineRun(run, data, context, place).train()


def schedule_grid(run: RunConfig) -> str:
    """The run's schedule drawn as a grid (forward 1 unit, backward 2), with its bubble."""
    o: PipelineOptions = run.strategy.options
    v = o.virtual_stages
    plan = build(o.schedule, o.stages, o.microbatches, v)
    slots = simulate(plan, 1.0 / v, 2.0 / v)  # a chunk holds 1/v of the stage's layers
    bubbles = bubble_fraction(slots, o.stages)
    costs = ("B: input gradient, 1 unit; W: weight gradient, 1 unit" if splits(plan) else "B: backward, 2 units")
    name = o.schedule if o.schedule in SCHEDULES else "the given"  # a name, or a schedule's text
    chunks = (f" x {v} chunks each (a, b, ...: the chunk; each action 1/{v} of the stage's)"
              if v > 1 else "")
    lines = [f"{name} schedule, {o.stages} stages{chunks} x {o.microbatches} micro-batches "
             f"(F: forward, 1 unit; {costs}; .: idle)", render(slots, o.stages, 1.0 / v), ""]
    for stage in range(o.stages):
        lines.append(f"stage {stage}: bubble {bubbles[stage]:.3f}, peak activations "
                     f"{peak_activations(plan[stage])} micro-batches")
    if placement_of(plan) == V_SHAPE:
        lines.append(f"a V: chunk a runs down the stages, chunk b back up (stage s holds model stages s and "
                     f"{2 * o.stages - 1}-s); 1F1B's theoretical bubble (P-1)/(M+P-1) is "
                     f"{theoretical_bubble(o.stages, o.microbatches):.3f}, ZB-V's (simulated, F = B = W) "
                     f"{expected_bubble(plan, o.microbatches):.3f} (peak activations count chunks, "
                     f"each 1/{v} of a stage's)")
    elif v > 1:
        lines.append(f"interleaved 1F1B's theoretical bubble (P-1)/(vM+P-1) = "
                     f"{theoretical_bubble(o.stages, o.microbatches, v):.3f} (peak activations count chunks, "
                     f"each 1/{v} of a stage's)")
    else:
        lines.append(f"GPipe and 1F1B's theoretical bubble (P-1)/(M+P-1) = "
                     f"{theoretical_bubble(o.stages, o.microbatches):.3f}")
    return "\n".join(lines)



register(PipelineStrategy())

"""The training step shared by every strategy: batch plan, optimizer, one epoch, evaluation.

The batch plan is what makes strategies comparable: global batch j of an epoch is the
j-th block of a permutation fixed by (seed, epoch), and worker r of W takes every W-th
example of that block. The W shards of a step are disjoint and together form exactly the
global batch a single process would take, so averaged gradients match.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

import models
from models.base import regressing_families
from models.targets import finish_means, supports_regression
from pipelines.config import OPTIMIZERS, ConfigError, OptimSection, RunConfig
from pipelines.imported_model import ImportedModel
from pipelines.training.precision import NoScaler, autocast
from pipelines.training.schedule import LearningRate, follow


@dataclass(frozen=True)
class ModelShape:
    """What a model is built for, as a `pipelines.data.Dataset` tells it: its input shape,
    its outputs per example and its task (for a regression, the target's scale)."""
    input_shape: tuple[int, ...]
    num_outputs: int
    task: str = "classification"
    target_mean: float = 0.0
    target_std: float = 1.0


def build_model(run: RunConfig, data: ModelShape) -> nn.Module:
    """The run's model for `data` (a `pipelines.data.Dataset`: its input shape, outputs and
    task) with initial weights fixed by the run's seed: a family of `models/`, or a user's
    module behind the same seams (`pipelines.imported_model`). On a regression task it
    regresses the target at the training split's scale."""
    torch.manual_seed(run.seed)
    shape, outputs = tuple(data.input_shape), data.num_outputs
    if isinstance(run.model.params, ImportedModel):
        model = run.model.params.build(shape, outputs)
    else:
        model = models.get(run.model.name).build(run.model.params, shape, outputs)
    if data.task == "regression":
        if not supports_regression(model):
            raise ConfigError(f"model {run.model.name} cannot regress a target (data.task regression): it is "
                              f"not a supervised predictor; these are: {', '.join(regressing_families())} "
                              "and modules of your own")
        model.regress(data.target_mean, data.target_std)
    return model


def steps_per_epoch(examples: int, global_batch: int, cap: int | None = None) -> int:
    steps = examples // global_batch
    return min(steps, cap) if cap else steps


def run_steps_per_epoch(run: RunConfig, data) -> int:
    """Optimizer steps per epoch of the run's training rows (in memory or streamed): its
    global batches, `optim.accumulate` of them to a step."""
    batches = steps_per_epoch(data.train_rows, run.data.batch_size, run.optim.steps_per_epoch)
    return -(-batches // run.optim.accumulate)


def _lookahead(batches):
    """The batches, the last one marked: (None, last) in its place."""
    previous = None
    for batch in batches:
        if previous is not None:
            yield previous
        previous = batch
    if previous is not None:
        yield None, previous


def epoch_permutation(examples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(examples, generator=generator)


def batch_indices(examples: int, global_batch: int, *, seed: int, epoch: int, rank: int = 0,
                  world: int = 1, cap: int | None = None) -> Iterator[torch.Tensor]:
    """Indices of this worker's shard of each global batch of the epoch."""
    order = epoch_permutation(examples, seed, epoch)
    for step in range(steps_per_epoch(examples, global_batch, cap)):
        block = order[step * global_batch:(step + 1) * global_batch]
        yield block[rank::world]


def make_optimizer(section: OptimSection, params, updates_per_epoch: int | None = None) -> torch.optim.Optimizer:
    """The section's optimizer, its lr following the section's schedule over its own update
    count (`pipelines.training.schedule`) where `updates_per_epoch` says how many updates
    an epoch makes; constant where None (greedy pre-training phases)."""
    cls = getattr(torch.optim, OPTIMIZERS[section.name])
    momentum = {"momentum": section.momentum} if section.name == "sgd" else {}
    optimizer = cls(params, lr=section.lr, weight_decay=section.weight_decay, **momentum)
    return follow(optimizer, LearningRate(section, updates_per_epoch))


def restore_optimizer(optimizer, state: dict, section: OptimSection) -> None:
    """Load a saved optimizer state (into a `torch.optim.Optimizer` or a ps shard's
    `ShardOptimizer`, which share the layout) but train with the config's hyper-parameters.

    The saved param groups carry the lr they were saved with; a PBT trial restored from
    another trial's checkpoint with a perturbed lr must train with its own.
    """
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["lr"] = section.lr
        group["weight_decay"] = section.weight_decay
        if "momentum" in group:
            group["momentum"] = section.momentum


class Objective(nn.Module):
    """Wraps a model so that ``forward(*batch)`` is its training loss.

    DDP synchronises gradients only for work done inside its wrapped module's forward,
    and a model's objective is ``loss(batch)``, not ``forward(x)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.model.loss(batch)


class InMemory:
    """Training rows held as tensors: each epoch's batches follow the batch plan above.
    A streamed table (`pipelines.streaming.Streamed`) offers the same `epoch`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def epoch(self, global_batch: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
              cap: int | None = None, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, ...]]:
        """This worker's shard of each global batch of the epoch, on `device`."""
        for idx in batch_indices(len(self.y), global_batch, seed=seed, epoch=epoch, rank=rank, world=world, cap=cap):
            yield self.x[idx].to(device, non_blocking=True), self.y[idx].to(device, non_blocking=True)


def train_epoch(objective: nn.Module, optimizer: torch.optim.Optimizer, batches,
                grad_clip: float | None = None, grad_norms=None, precision: str = "fp32",
                loss_scaler=None, accumulate: int = 1, progress=None) -> tuple[float, int]:
    """One pass over `batches` ((x, y) on the model's device); returns (mean loss over
    steps, examples seen).

    `grad_norms` (a `diagnostics.GradNorms`) records each layer's gradient after backward.
    `precision` bf16 or fp16 runs the forward under autocast (`pipelines.training.precision`);
    fp16 scales the loss with `loss_scaler`, kept across epochs by the caller. `accumulate`
    batches add their gradients (each loss over `accumulate`) before one step, DDP's
    synchronisation held back (`no_sync`) until the last of them; an epoch's last, shorter
    group steps on the mean over its own batches. `progress(steps, rows)` hears of each
    step (`pipelines.training.progress`).
    """
    objective.train()
    total = None
    steps, seen = 0, 0
    scaling = loss_scaler or NoScaler()
    pending = 0
    # only an accumulating loop looks one batch ahead (to close an epoch's short last group):
    # a batch asked for early would start the first-step clock (`epochs._after_first`) early
    for xb, yb in (_lookahead(batches) if accumulate > 1 else batches):
        last = xb is None
        if last:
            xb, yb = yb
        if pending == 0:
            optimizer.zero_grad(set_to_none=True)
        pending += 1
        closes = pending == accumulate or last
        hold = objective.no_sync() if not closes and hasattr(objective, "no_sync") else contextlib.nullcontext()
        with hold:
            with autocast(precision, xb.device):
                loss = objective(xb, yb)
            scaling.scale(loss / accumulate if accumulate > 1 else loss).backward()
        total = loss.detach().double() if total is None else total + loss.detach()
        steps += 1
        seen += len(yb)
        if progress is not None:
            progress(steps, seen)
        if not closes:
            continue
        if pending < accumulate:  # a short last group: the mean over its own batches
            for p in objective.parameters():
                if p.grad is not None:
                    p.grad.mul_(accumulate / pending)
        pending = 0
        scaling.unscale_(optimizer)  # clipping and the gradient norms see the true gradients
        if grad_norms is not None:
            grad_norms.add()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
        scaling.step(optimizer)
        scaling.update()
    # no host sync per step: the loss is read once per epoch (a mean over batches)
    mean = (total.item() if total is not None else 0.0) / max(steps, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(
            f"training loss became {mean} after {steps} steps; lower optim.lr or set optim.grad_clip")
    return mean, seen


@torch.no_grad()
def evaluate_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-example metric sums (and `count`) of the model over (x, y)."""
    model.eval()
    sums: dict[str, float] = {}
    for start in range(0, len(y), batch_size):
        batch = (x[start:start + batch_size].to(device), y[start:start + batch_size].to(device))
        for key, value in model.evaluate(batch).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def mean_metrics(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Metric sums divided by their count, `*_per_step` ones by their `steps` (and a
    regressor's RMSE and R² made of them), named `prefix_metric`."""
    count = sums.get("count", 0.0)
    if not count:
        return {}
    # a sequence model's `*_per_step` sums are over its observed steps (`steps`), not its examples
    steps = sums.get("steps") or count
    means = finish_means({k: v / (steps if k.endswith("_per_step") else count)
                          for k, v in sums.items() if k not in ("count", "steps")})
    return {f"{prefix}_{k}": v for k, v in means.items()}

"""The training step shared by every strategy: batch plan, optimizer, one epoch, evaluation.

The batch plan is what makes strategies comparable: global batch j of an epoch is the
j-th block of a permutation fixed by (seed, epoch), and worker r of W takes every W-th
example of that block. The W shards of a step are disjoint and together form exactly the
global batch a single process would take, so averaged gradients match.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn

import models
from pipelines.config import OPTIMIZERS, OptimSection, RunConfig
from pipelines.imported_model import ImportedModel


def build_model(run: RunConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The run's model with initial weights fixed by the run's seed: a family of `models/`,
    or a user's module behind the same seams (`pipelines.imported_model`)."""
    torch.manual_seed(run.seed)
    if isinstance(run.model.params, ImportedModel):
        return run.model.params.build(tuple(input_shape), num_classes)
    return models.get(run.model.name).build(run.model.params, tuple(input_shape), num_classes)


def steps_per_epoch(examples: int, global_batch: int, cap: int | None = None) -> int:
    steps = examples // global_batch
    return min(steps, cap) if cap else steps


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


def make_optimizer(section: OptimSection, params) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, OPTIMIZERS[section.name])
    momentum = {"momentum": section.momentum} if section.name == "sgd" else {}
    return cls(params, lr=section.lr, weight_decay=section.weight_decay, **momentum)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, section: OptimSection) -> None:
    """Load a saved optimizer state but train with the config's hyper-parameters.

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


def train_epoch(objective: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, batches, device: torch.device | str = "cpu",
                grad_clip: float | None = None, grad_norms=None) -> tuple[float, int]:
    """One pass over `batches`; returns (mean loss over steps, examples seen).

    `grad_norms` (a `diagnostics.GradNorms`) records each layer's gradient after backward.
    """
    objective.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    steps, seen = 0, 0
    for idx in batches:
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = objective(xb, yb)
        loss.backward()
        if grad_norms is not None:
            grad_norms.add()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
        optimizer.step()
        total += loss.detach()  # no host sync per step: read once per epoch
        steps += 1
        seen += len(idx)
    mean = total.item() / max(steps, 1)
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
    """Metric sums divided by their count, named `prefix_metric`."""
    count = sums.get("count", 0.0)
    if not count:
        return {}
    return {f"{prefix}_{k}": v / count for k, v in sums.items() if k != "count"}

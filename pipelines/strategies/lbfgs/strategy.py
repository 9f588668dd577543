"""`lbfgs`: full-batch (or large-batch) L-BFGS on Ray actors (DistBelief's Sandblaster).

S shard actors (`shard`) hold slices of the parameters and of every vector L-BFGS
keeps (gradient, direction, the m history pairs); W worker actors (`worker`) hold
the training data and compute the loss and gradient of portions of it; the coordinator
(`engine`, run here in the driver) runs torch.optim.LBFGS's algorithm, strong-Wolfe
line search included, by sending the shards scalar-only commands and the workers portions
to evaluate (`pool`: handed out as workers finish, with backups for stragglers and
replacements for dead workers). It never holds a whole vector; this driver assembles the
model only at the end of an epoch, to validate and checkpoint it.

An "epoch" is one call of torch's ``LBFGS.step``: up to `iterations_per_epoch` iterations
on that epoch's objective (the mean loss over the training split, or over a fixed sample
of `batch_size` examples drawn per epoch), then validation and a checkpoint.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pipelines.config import ConfigError, RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.registry import register
from pipelines.strategies.base import FitResult, Strategy, require, require_shards_hold_parameters
from pipelines.strategies.lbfgs.driver import Sandblaster
from pipelines.strategies.lbfgs.worker import has_batch_norm
from pipelines.training import placement
from pipelines.training.placement import worker_bundle


@dataclass
class LbfgsOptions:
    shards: int = 1
    """Parameter shards (`--shards`) holding the slices of every L-BFGS vector."""
    history: int = 10
    """Pairs (s, y) kept for the inverse-Hessian approximation (torch's history_size)."""
    iterations_per_epoch: int = 20
    """Iterations per epoch (torch's max_iter of one `step`); validation and a checkpoint follow."""
    max_evals_per_epoch: Optional[int] = None
    """Objective evaluations per epoch (torch's max_eval); default 5/4 of the iterations."""
    lr: float = 1.0
    """Scale of each line search's first trial step (torch's lr; optim.lr is SGD's and unused)."""
    line_search: str = "strong_wolfe"
    """The line search: strong_wolfe (torch's, the only one)."""
    tolerance_grad: float = 1e-7
    """An epoch stops once max |gradient| is at most this (torch's)."""
    tolerance_change: float = 1e-9
    """An epoch stops once the loss or the step changes less than this (torch's)."""
    batch_size: Optional[int] = None
    """Examples per objective: unset for the whole training split, else a fixed sample of
    this many drawn anew each epoch (large-batch L-BFGS)."""
    portions: Optional[int] = None
    """Portions the examples are cut into, handed to workers as they finish; default 4 x workers."""
    backup_after: float = 2.0
    """A portion still running this many times the median portion time gets a backup copy on
    an idle worker (the first answer wins); 0: no backups."""
    max_worker_restarts: int = 3
    """Dead workers replaced before the run fails; -1: no limit."""
    allow_stochastic: bool = False
    """Train a model whose loss draws random numbers (dropout, sampling): the draws then come
    from a fixed seed per portion, so each evaluation of a point sees the same noise."""

    def portions_for(self, run: RunConfig) -> int:
        return self.portions or 4 * run.resources.workers


class LbfgsStrategy(Strategy):
    name = "lbfgs"
    options = LbfgsOptions
    description = "distributed L-BFGS (Sandblaster): vector arithmetic on shards, portions load-balanced"
    streams = True  # each evaluation reads its portion's files (`streamed.py`)

    def validate(self, run: RunConfig) -> None:
        o: LbfgsOptions = run.strategy.options
        workers = run.resources.workers
        require([
            (o.shards >= 1, f"strategy.shards must be >= 1, got {o.shards}"),
            (o.history >= 1, f"strategy.history must be >= 1, got {o.history}"),
            (o.iterations_per_epoch >= 1,
             f"strategy.iterations_per_epoch must be >= 1, got {o.iterations_per_epoch}"),
            (o.max_evals_per_epoch is None or o.max_evals_per_epoch >= 2,
             f"strategy.max_evals_per_epoch must be >= 2 (one at the start, one for the line "
             f"search), got {o.max_evals_per_epoch}"),
            (o.lr > 0, f"strategy.lr must be > 0, got {o.lr}"),
            (not (run.data.stream and o.batch_size is not None),
             "lbfgs on a streamed table (data.stream) takes every training row as its objective, read "
             "portion by portion: unset strategy.batch_size"),
            (run.optim.accumulate == 1, "lbfgs sums its portions' gradients into one full-batch step: "
                                        "optim.accumulate does not apply (drop it)"),
            (run.optim.precision == "fp32", "lbfgs's line search compares losses to float32 precision: "
                                            f"optim.precision {run.optim.precision} does not apply (drop it)"),
            (not run.optim.scheduled, "lbfgs takes its step lengths from its line search: optim.schedule "
                                      "and optim.warmup_epochs do not apply (drop them)"),
            (o.line_search == "strong_wolfe",
             f"strategy.line_search must be strong_wolfe, got {o.line_search!r}"),
            (o.tolerance_grad >= 0, f"strategy.tolerance_grad must be >= 0, got {o.tolerance_grad}"),
            (o.tolerance_change >= 0, f"strategy.tolerance_change must be >= 0, got {o.tolerance_change}"),
            (o.batch_size is None or o.batch_size >= 1,
             f"strategy.batch_size must be >= 1 (or unset for the full batch), got {o.batch_size}"),
            (o.portions is None or o.portions >= workers,
             f"strategy.portions ({o.portions}) must be >= resources.workers ({workers}): "
             "every worker needs a portion"),
            (o.backup_after == 0 or o.backup_after >= 1,
             f"strategy.backup_after must be 0 (no backups) or >= 1, got {o.backup_after}"),
            (o.max_worker_restarts >= -1,
             f"strategy.max_worker_restarts must be >= -1, got {o.max_worker_restarts}"),
            (run.optim.grad_clip is None,
             f"optim.grad_clip ({run.optim.grad_clip}) does not apply to lbfgs: its line search "
             "sets the step; unset it"),
        ])  # optim.weight_decay >= 0 is the config's own check, for every strategy

    def actor_bundles(self, run: RunConfig) -> list[dict[str, float]]:
        return [worker_bundle(run)] * run.resources.workers  # shards take no CPU of their own

    def check_model(self, run: RunConfig, model: nn.Module, data: Dataset) -> None:
        o: LbfgsOptions = run.strategy.options
        require_shards_hold_parameters(run, model)
        train = data.train_rows
        if data.stream is not None and has_batch_norm(model):
            raise ConfigError(f"model {run.model.name} has batch norm, whose statistics lbfgs computes from "
                              "a portion in memory: it cannot stream a table (drop data.stream)")
        examples = min(o.batch_size or train, train)
        if o.batch_size is not None and o.batch_size > train:
            raise ConfigError(f"strategy.batch_size ({o.batch_size}) exceeds the training split "
                              f"({train} examples)")
        if o.portions_for(run) > examples:
            raise ConfigError(f"strategy.portions ({o.portions_for(run)}) exceeds the {examples} "
                              "examples of each objective: a portion would be empty")
        reason = stochastic_loss(model, data.sample(64))
        if reason and not o.allow_stochastic:
            raise ConfigError(
                f"model {run.model.name} has a stochastic loss ({reason}): L-BFGS's line search "
                "needs the same loss each time it evaluates a point; set "
                "strategy.allow_stochastic=true to draw the noise from a fixed seed per portion")

    def fit(self, run: RunConfig, data: Dataset, context: RunContext) -> FitResult:
        labels = [f"worker-{i}" for i in range(run.resources.workers)]
        with placement.reserve(self, run, context.say, labels) as place:
            context.tracker.startup("placement")
            driver = Sandblaster(run, data, context, place)
            try:
                return driver.train()
            finally:
                driver.close()


def stochastic_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> str | None:
    """Why the model's training loss is random, or None: dropout layers, or two evaluations
    of the same batch that differ (sampling, corruption, persistent chains...)."""
    dropout = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropout:
        return f"{len(dropout)} dropout layer{'s' if len(dropout) > 1 else ''} with p={dropout[0].p}"
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        first, second = probe.loss(batch), probe.loss(batch)
    if not torch.equal(first, second):
        return (f"two evaluations of the same batch gave {float(first):.6g} and "
                f"{float(second):.6g}")
    return None



register(LbfgsStrategy())

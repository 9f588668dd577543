"""The epoch loop shared by the data-parallel strategies (`local`, `allreduce`).

A strategy supplies a `Collective` (its rank, world size, device, how it wraps the model
and how it sums numbers across workers) and a hook for the end of each epoch (checkpoint,
then log and report: `RunContext.epoch_done` where the driver trains); the loop does the
rest the same way everywhere: greedy pre-training phases if the model has any, then the
epochs, metrics and gradient norms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pipelines.config import RunConfig
from pipelines.data import Dataset
from pipelines.training import precision, schedule
from pipelines.training.diagnostics import GradNorms
from pipelines.training.loop import (
    InMemory,
    Objective,
    build_model,
    evaluate_sums,
    make_optimizer,
    mean_metrics,
    restore_optimizer,
    run_steps_per_epoch,
    steps_per_epoch,
    train_epoch,
)
from pipelines.training.progress import EpochProgress


@dataclass
class Collective:
    """What a data-parallel strategy tells the loop about its workers; defaults: one process."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    """Wraps a module whose forward is the loss (DDP for allreduce)."""
    sum: Callable[[list[float]], list[float]] = lambda values: values
    """Sums a list of numbers over all workers."""


EpochHook = Callable[[int, dict, nn.Module, torch.optim.Optimizer], "bool | None"]
"""Ends an epoch (checkpoint, log, report); a true result ends the training after it."""


def train_epochs(run: RunConfig, data: Dataset, tracker, comm: Collective, state: dict | None,
                 after_epoch: EpochHook, on_first_step: Callable[[], None] | None = None,
                 source=None) -> nn.Module:
    """Train from `state` (or from scratch, pre-training first) to the last epoch, on the
    training rows of `source` (default: `data`'s, in memory)."""
    model = build_model(run, data).to(comm.device)
    source = source or InMemory(data.x_train.to(comm.device), data.y_train.to(comm.device))
    start = 0
    if state:
        model.load_state_dict(state["model"])
        start = state["epoch"] + 1
    else:
        pretrain(model, run, source, tracker, comm)
    objective = comm.wrap(Objective(model))
    optimizer = make_optimizer(run.optim, model.parameters(), run_steps_per_epoch(run, data))
    if state:
        restore_optimizer(optimizer, state["optimizer"], run.optim)
    torch.manual_seed(run.seed * 1009 + comm.rank + start)  # dropout differs per worker
    x_val, y_val = data.x_val[comm.rank::comm.world], data.y_val[comm.rank::comm.world]
    meter = GradNorms(model) if run.tracking.grad_norms else None
    loss_scaler = precision.scaler(run.optim.precision, comm.device)  # fp16's scale carries across epochs
    for epoch in range(start, run.optim.epochs):
        began = time.perf_counter()
        batches = source.epoch(run.data.batch_size, seed=run.seed, epoch=epoch, rank=comm.rank,
                               world=comm.world, cap=run.optim.steps_per_epoch, device=comm.device)
        if on_first_step is not None and epoch == start:
            batches = _after_first(batches, on_first_step)
        progress = EpochProgress(tracker.say if comm.rank == 0 else None, epoch, run.optim.epochs,
                                 steps_per_epoch(data.train_rows, run.data.batch_size, run.optim.steps_per_epoch),
                                 comm.world)
        loss, seen = train_epoch(objective, optimizer, batches, run.optim.grad_clip, meter,
                                 run.optim.precision, loss_scaler, run.optim.accumulate, progress)
        elapsed = time.perf_counter() - began
        sums = evaluate_sums(model, x_val, y_val, device=comm.device)
        keys = sorted(sums)
        totals = comm.sum([loss, float(seen), elapsed] + [sums[k] for k in keys])
        metrics = {"train_loss": totals[0] / comm.world,
                   "samples_per_s": totals[1] / (totals[2] / comm.world),
                   **mean_metrics(dict(zip(keys, totals[3:])), "val")}
        if meter is not None:
            metrics.update(meter.means())  # gradients are already averaged: same on every rank
        metrics["lr"] = optimizer.param_groups[0]["lr"]  # the epoch's last step's: a schedule shows in MLflow
        schedule.observe(optimizer.param_groups, run.optim, metrics)  # before the checkpoint that keeps it
        if after_epoch(epoch, metrics, model, optimizer):  # True: stop here (optim.early_stopping)
            break
    return model


def driver_model(run: RunConfig, data: Dataset, context) -> tuple[nn.Module, dict | None]:
    """A driver's starting model and the state it resumes from: the run's last checkpoint
    under `--resume`, else fresh weights, greedily pre-trained on the driver if the model
    has pre-training phases (strategies whose workers only fine-tune)."""
    model = build_model(run, data)
    state = context.resume_state()
    if state:
        model.load_state_dict(state["model"])
        context.say(f"resumed from the checkpoint of epoch {state['epoch'] + 1}")
    else:
        pretrain(model, run, driver_rows(run, data), context.tracker, Collective())
    return model, state


def driver_rows(run: RunConfig, data: Dataset):
    """The training rows as a batch source read on this process: in memory, or a streamed
    table read through Ray Data here."""
    if data.stream is None:
        return InMemory(data.x_train, data.y_train)
    from pipelines.streaming import Streamed

    return Streamed(table=data.stream, on_driver=True)


def pretrain(model: nn.Module, run: RunConfig, source, tracker, comm: Collective) -> None:
    """Greedy layer-wise phases, each trained like a model of its own, logged per phase."""
    phases = model.pretrain_phases() if hasattr(model, "pretrain_phases") else []
    for index, phase in enumerate(phases):
        objective = comm.wrap(Objective(phase.module))
        optimizer = make_optimizer(run.optim, phase.module.parameters())
        loss_scaler = precision.scaler(run.optim.precision, comm.device)
        for epoch in range(phase.epochs):
            batches = source.epoch(run.data.batch_size, seed=run.seed + 7919 * (index + 1), epoch=epoch,
                                   rank=comm.rank, world=comm.world, cap=run.optim.steps_per_epoch,
                                   device=comm.device)
            loss, _ = train_epoch(objective, optimizer, batches, run.optim.grad_clip,
                                  precision=run.optim.precision, loss_scaler=loss_scaler)
            (total,) = comm.sum([loss])
            if comm.rank == 0:
                tracker.log_metrics({f"pretrain_{phase.name}_loss": total / comm.world}, step=epoch)
                tracker.say(f"pre-training {phase.name} epoch {epoch + 1}/{phase.epochs}  "
                            f"loss {total / comm.world:.4f}")


def _after_first(batches, callback: Callable[[], None]):
    """The batches, calling `callback` once the first step is over: when the loop asks for
    the second batch, or for the end of an epoch of one batch."""
    count = 0
    for idx in batches:
        if count == 1:
            callback()
        count += 1
        yield idx
    if count == 1:
        callback()

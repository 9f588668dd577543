"""Learning-rate schedules as a function of an optimizer's own update count.

Every optimizer raydeep builds (`loop.make_optimizer`) sets its learning rate before each
step from the number of steps it has taken, kept in its param groups (`"update"`): the
count is saved and restored with the optimizer's state, so a resumed run, a restarted ps
shard or a pipeline stage go on with the rate they left off at, with no scheduler object
of their own to checkpoint. The same function of the same count under every strategy: a
training step under local, allreduce and pipeline, an applied push on each ps shard, an
inner step of diloco. Closed forms of torch's `LinearLR` (warm-up), `CosineAnnealingLR` and
`StepLR` chained by `SequentialLR` (tests/unit/test_optim_settings.py holds them equal).

`plateau` is no function of the count: it follows the epochs' validation metric, as torch's
`ReduceLROnPlateau` does. Its state (the best value, the epochs waited, the factor reached)
is kept in the param groups too (`observe`), so it is checkpointed, restored and restarted
with the optimizer like the count; every optimizer of a run (each pipeline stage's, each
allreduce rank's) observes the same metrics after the same epoch and so holds the same rate.
"""
from __future__ import annotations

import math

import torch

from pipelines.optim_config import OptimSection, maximised

PLATEAU_KEY = "plateau"
"""The param-group entry holding plateau's state."""


class LearningRate:
    """lr(update): warm-up, then the schedule, over `updates_per_epoch` x `epochs` updates."""

    def __init__(self, section: OptimSection, updates_per_epoch: int | None):
        self.base, self.kind = section.lr, section.schedule if updates_per_epoch else "constant"
        per_epoch = max(updates_per_epoch or 1, 1)
        self.warmup = round(section.warmup_epochs * per_epoch) if updates_per_epoch else 0
        self.total = section.epochs * per_epoch
        self.min_lr, self.gamma = section.min_lr, section.lr_gamma
        self.period = section.lr_step_epochs * per_epoch

    def __call__(self, update: int) -> float:
        if update < self.warmup:  # LinearLR(start_factor=1/W, total_iters=W)
            start = 1.0 / self.warmup
            return self.base * (start + (1.0 - start) * update / self.warmup)
        after = update - self.warmup
        if self.kind == "cosine":  # CosineAnnealingLR(T_max=total - W, eta_min=min_lr)
            span = max(self.total - self.warmup, 1)
            return self.min_lr + (self.base - self.min_lr) * (1 + math.cos(math.pi * min(after, span) / span)) / 2
        if self.kind == "step":  # StepLR(step_size=period, gamma)
            return self.base * self.gamma ** (after // self.period)
        return self.base


def advance(group: dict, rate: LearningRate) -> None:
    """Before a step: the group's lr becomes rate(its update count) times its `lr_scale` (1;
    a ps shard's staleness-aware rate divides it) and plateau's factor (1 until it first
    lowers the rate), and the count goes up."""
    update = group.get("update", 0)
    group["lr"] = rate(update) * group.get("lr_scale", 1.0) * group.get(PLATEAU_KEY, {}).get("factor", 1.0)
    group["update"] = update + 1


def follow(optimizer: torch.optim.Optimizer, rate: LearningRate) -> torch.optim.Optimizer:
    """A torch optimizer whose every param group `advance`s before each step."""

    def before_step(opt, args, kwargs):
        for group in opt.param_groups:
            advance(group, rate)

    optimizer.register_step_pre_hook(before_step)
    return optimizer


def observe(param_groups: list[dict], section: OptimSection, metrics: dict[str, float]) -> None:
    """After an epoch: under `plateau`, judge its `plateau_metric` as ReduceLROnPlateau's
    step does (relative threshold, no cooldown) and lower the factor of every group that has
    waited more than `lr_patience` epochs, by `lr_gamma`, the rate no lower than `min_lr`.
    The factor (not an lr) is what is kept: a PBT trial that restores another's state with a
    perturbed lr goes on from its own lr. A no-op under any other schedule."""
    if section.schedule != "plateau":
        return
    value = float(metrics[section.plateau_metric])
    upwards = maximised(section.plateau_metric)
    for group in param_groups:
        state = dict(group.get(PLATEAU_KEY) or {"best": -math.inf if upwards else math.inf, "bad": 0, "factor": 1.0})
        better = (value > state["best"] * (1.0 + section.plateau_threshold) if upwards
                  else value < state["best"] * (1.0 - section.plateau_threshold))
        state["best"], state["bad"] = (value, 0) if better else (state["best"], state["bad"] + 1)
        if state["bad"] > section.lr_patience:
            old = section.lr * state["factor"]
            new = max(old * section.lr_gamma, section.min_lr)
            if old - new > 1e-8:  # ReduceLROnPlateau's eps: a change too small to make
                state["factor"] = new / section.lr
            state["bad"] = 0
        group[PLATEAU_KEY] = state


"""`local`: the single-process reference loop that every distributed strategy must match."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import checkpoint
from pipelines.config import RunConfig
from pipelines.data import Dataset
from pipelines.loop import (Objective, batch_indices, evaluate_sums, make_optimizer, mean_metrics,
                            train_epoch)
from pipelines.strategy import FitResult, Strategy, build_model, register


@dataclass
class LocalOptions:
    """The local loop has no options of its own."""


class LocalStrategy(Strategy):
    name = "local"
    config = LocalOptions
    description = "single process, no Ray: the reference every strategy is tested against"
    uses_ray = False

    def fit(self, run: RunConfig, data: Dataset, tracker, run_dir: Path) -> FitResult:
        model = build_model(run, data.input_shape, data.num_classes)
        optimizer = make_optimizer(run.optim, model.parameters())
        objective = Objective(model)
        start = 0
        state = checkpoint.load_latest(run_dir) if run.resume else None
        if state:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["epoch"] + 1
        torch.manual_seed(run.seed + start)
        history = []
        for epoch in range(start, run.optim.epochs):
            began = time.perf_counter()
            batches = batch_indices(len(data.y_train), run.data.batch_size, seed=run.seed,
                                    epoch=epoch, cap=run.optim.steps_per_epoch)
            loss, seen = train_epoch(objective, optimizer, data.x_train, data.y_train, batches,
                                      grad_clip=run.optim.grad_clip)
            elapsed = time.perf_counter() - began
            metrics = {"train_loss": loss, "samples_per_s": seen / elapsed,
                       **mean_metrics(evaluate_sums(model, data.x_val, data.y_val), "val")}
            checkpoint.save(run_dir / checkpoint.directory_name(epoch), epoch=epoch,
                            model=model.state_dict(), optimizer=optimizer.state_dict())
            tracker.log_epoch(epoch, metrics)
            history.append(metrics)
        return FitResult({k: v.detach().cpu() for k, v in model.state_dict().items()}, history)


register(LocalStrategy())

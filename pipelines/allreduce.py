"""`allreduce`: synchronous data parallelism on Ray Train (`TorchTrainer` + DDP).

gloo on CPU, NCCL when workers hold GPUs. Every worker takes a disjoint shard of each
global batch; DDP averages the gradients, so a step equals the single-process step on the
whole global batch (tests hold it to `local` with `assert_close`). Rank 0 checkpoints every
epoch; a lost worker restarts the group from the last checkpoint (`FailureConfig`).
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipelines import checkpoint
from pipelines.config import ConfigError, RunConfig
from pipelines.data import Dataset
from pipelines.loop import Objective, batch_indices, evaluate_sums, make_optimizer, mean_metrics, train_epoch
from pipelines.strategy import FitResult, Strategy, build_model, register


@dataclass
class AllreduceOptions:
    max_failures: int = 3
    """Worker-group restarts (from the last checkpoint) before the run fails; -1: no limit."""
    backend: Optional[str] = None
    """torch.distributed backend; default gloo on CPU, nccl on GPU."""
    keep_checkpoints: int = 2
    """Checkpoints kept on storage (the newest ones)."""


class AllreduceStrategy(Strategy):
    name = "allreduce"
    config = AllreduceOptions
    description = "synchronous data parallelism: Ray Train TorchTrainer + DDP (gloo/NCCL)"

    def validate(self, run: RunConfig) -> None:
        workers, batch = run.resources.workers, run.data.batch_size
        if batch % workers:
            raise ConfigError(
                f"data.batch_size ({batch}) must be divisible by resources.workers ({workers}): "
                "each worker takes an equal shard of every global batch")
        options: AllreduceOptions = run.strategy.params
        if options.backend not in (None, "gloo", "nccl"):
            raise ConfigError(f"strategy.backend must be gloo or nccl, got {options.backend!r}")
        if options.backend == "nccl" and run.resources.gpus_per_worker <= 0:
            raise ConfigError("strategy.backend nccl needs resources.gpus_per_worker > 0")
        if options.keep_checkpoints < 1:
            raise ConfigError(f"strategy.keep_checkpoints must be >= 1, got {options.keep_checkpoints}")

    def fit(self, run: RunConfig, data: Dataset, tracker, run_dir: Path) -> FitResult:
        import ray
        from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as TrainRunConfig,
                               ScalingConfig)
        from ray.train.torch import TorchConfig, TorchTrainer

        options: AllreduceOptions = run.strategy.params
        gpus = run.resources.gpus_per_worker
        resources: dict[str, float] = {"CPU": run.resources.cpus_per_worker}
        if gpus > 0:
            resources["GPU"] = gpus
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "run": run,
                "data": ray.put(data),
                "tracker": tracker,
                "run_dir": str(run_dir),
                "submitted_at": time.time(),
            },
            torch_config=TorchConfig(backend=options.backend or ("nccl" if gpus > 0 else "gloo")),
            scaling_config=ScalingConfig(num_workers=run.resources.workers, use_gpu=gpus > 0,
                                         resources_per_worker=resources),
            run_config=TrainRunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=options.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=options.keep_checkpoints),
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as directory:
                state = checkpoint.load(directory)
        else:  # a resumed run that had no epoch left to train
            state = checkpoint.load_latest(run_dir)
        if state is None:
            raise RuntimeError(f"allreduce finished without a checkpoint under {run_dir}")
        starts = tracker.metric_history("worker_group_start_epoch")
        summary = {"worker_restarts": float(max(len(starts) - 1, 0))}
        first = tracker.metric_history("time_to_first_step_s")
        if first:
            summary["time_to_first_step_s"] = first[0]
        return FitResult(state["model"], tracker.epoch_history(), summary)


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    _quiet_report_logs()
    run: RunConfig = config["run"]
    data: Dataset = ray.get(config["data"])
    tracker = config["tracker"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    model = build_model(run, data.input_shape, data.num_classes)
    state = _restore(config)
    start = state["epoch"] + 1 if state else 0
    if state:
        model.load_state_dict(state["model"])
    objective = ray.train.torch.prepare_model(Objective(model))
    optimizer = make_optimizer(run.optim, model.parameters())
    if state:
        optimizer.load_state_dict(state["optimizer"])
    if rank == 0:
        tracker.log_metrics({"worker_group_start_epoch": start}, step=start)
        if state:
            print(f"resumed from the checkpoint of epoch {start}", flush=True, file=sys.__stdout__)
    torch.manual_seed(run.seed * 1009 + rank + start)  # dropout differs per worker, not per run

    # Small data sets live on the worker's device once, instead of a copy per step.
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val[rank::world], data.y_val[rank::world]
    first_step_logged = start > 0
    for epoch in range(start, run.optim.epochs):
        began = time.perf_counter()
        batches = batch_indices(len(data.y_train), run.data.batch_size, seed=run.seed, epoch=epoch,
                                rank=rank, world=world, cap=run.optim.steps_per_epoch)
        if not first_step_logged:
            batches = _mark_first_step(batches, tracker, config["submitted_at"], rank)
            first_step_logged = True
        loss, seen = train_epoch(objective, optimizer, x_train, y_train, batches, device,
                                      run.optim.grad_clip)
        elapsed = time.perf_counter() - began
        sums = evaluate_sums(model, x_val, y_val, device=device)
        keys = sorted(sums)
        totals = torch.tensor([loss, float(seen), elapsed] + [sums[k] for k in keys],
                              dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        totals = totals.tolist()
        metrics = {"train_loss": totals[0] / world,
                   "samples_per_s": totals[1] / (totals[2] / world),
                   **mean_metrics(dict(zip(keys, totals[3:])), "val")}
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                tracker.log_epoch(epoch, metrics)
                checkpoint.save(tmp, epoch=epoch, model=_cpu(model.state_dict()),
                                optimizer=optimizer.state_dict())
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "epoch": epoch}, checkpoint=saved,
                             checkpoint_dir_name=checkpoint.directory_name(epoch))


def _quiet_report_logs() -> None:
    """Ray Train logs every report at INFO from a logger outside `ray.train`; once per epoch
    per worker, that would bury the progress lines."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _restore(config: dict[str, Any]) -> dict | None:
    """The newest state: Ray Train's last registered checkpoint or the newest on storage.

    Storage can be ahead of Ray Train: a checkpoint is written before the controller
    registers it, and a worker lost in between must not send the run back to epoch 0.
    This is also how `--resume` finds the state of an earlier run of the same name.
    """
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        with registered.as_directory() as directory:
            candidates.append(checkpoint.load(directory))
    on_storage = checkpoint.load_latest(config["run_dir"])
    if on_storage is not None:
        candidates.append(on_storage)
    return max(candidates, key=lambda state: state["epoch"], default=None)


def _mark_first_step(batches, tracker, submitted_at: float, rank: int):
    """Pass the batches through, logging the time from submission to the first step's end."""
    for i, idx in enumerate(batches):
        if i == 1 and rank == 0:
            tracker.log_metrics({"time_to_first_step_s": time.time() - submitted_at})
        yield idx


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


register(AllreduceStrategy())

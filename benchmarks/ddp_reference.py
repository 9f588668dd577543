"""Plain torchrun + DDP reference for `allreduce_vs_ddp.py` (no Ray anywhere).

Launched by the benchmark as

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node W \\
        benchmarks/ddp_reference.py --config run.json --out result.json [--loop plain|raydeep]

It trains the model of the raydeep run config in `run.json` on the same data
(`pipelines.data.load`), with the same initial weights (`pipelines.training.loop.build_model`),
the same batch plan (`pipelines.training.loop.batch_indices`: block j of the epoch's seeded
permutation, rank r takes every W-th example of it), the same optimizer
(`pipelines.training.loop.make_optimizer`) and the same DDP-wrapped `pipelines.training.loop.Objective`,
over gloo with one torch thread per process.

Each epoch's training steps are timed exactly as `pipelines.strategies.allreduce` times them: wall time
from building the epoch's batch plan to the end of its last step, per rank; samples/s of
the epoch = global examples stepped / mean over ranks of that time. Rank 0 writes the
per-epoch figures and the steady state (mean samples/s of the epochs after the first) to
`--out` as JSON.

`--loop plain` (default) runs an independent, idiomatic step loop (zero_grad, forward loss,
backward, step; the loss is summed as a tensor and read once per epoch); `--loop raydeep`
runs `pipelines.training.loop.train_epoch` itself, which tells the cost of raydeep's step loop apart
from the cost of running on Ray. `ray_train_worker` runs the same training as the body of a
Ray Train worker (the benchmark's `--ray-plain` row): Ray's environment without raydeep's code.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipelines import config as run_config
from pipelines import data as datasets
from pipelines.training.loop import (
    Objective,
    batch_indices,
    build_model,
    evaluate_sums,
    make_optimizer,
    train_epoch,
)


def plain_epoch(ddp: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, batches, on_first_step=None) -> tuple[float, int]:
    """The textbook DDP step loop; returns (mean loss over steps, examples seen)."""
    ddp.train()
    total = torch.zeros((), dtype=torch.float64)
    steps = seen = 0
    for idx in batches:
        xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = ddp(xb, yb)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
        seen += len(idx)
        if steps == 1 and on_first_step is not None:
            on_first_step()
    return total.item() / max(steps, 1), seen


def _first_step_marker(batches, on_first_step):
    """Pass the batches through; call `on_first_step` when the second batch is asked for."""
    for i, idx in enumerate(batches):
        if i == 1:
            on_first_step()
        yield idx


def train(run, data, rank: int, world: int, loop: str = "plain", label: str = "torchrun",
          launched_at: float | None = None) -> dict | None:
    """Train as the reference does in an initialised gloo group; rank 0 returns the figures."""
    model = build_model(run, data)
    ddp = DistributedDataParallel(Objective(model))
    optimizer = make_optimizer(run.optim, model.parameters())
    torch.manual_seed(run.seed * 1009 + rank)  # as pipelines.strategies.allreduce seeds each worker
    x_val, y_val = data.x_val[rank::world], data.y_val[rank::world]

    first_step_at: list[float] = []

    def mark() -> None:
        if not first_step_at:
            first_step_at.append(time.time())

    history = []
    for epoch in range(run.optim.epochs):
        began = time.perf_counter()
        batches = batch_indices(len(data.y_train), run.data.batch_size, seed=run.seed, epoch=epoch,
                                rank=rank, world=world, cap=run.optim.steps_per_epoch)
        if loop == "raydeep":
            if epoch == 0:
                batches = _first_step_marker(batches, mark)
            loss, seen = train_epoch(ddp, optimizer, ((data.x_train[i], data.y_train[i]) for i in batches),
                                     run.optim.grad_clip)
        else:
            loss, seen = plain_epoch(ddp, optimizer, data.x_train, data.y_train, batches,
                                     mark if epoch == 0 else None)
        elapsed = time.perf_counter() - began
        sums = evaluate_sums(model, x_val, y_val)  # untimed, as in raydeep's epoch
        keys = sorted(sums)
        totals = torch.tensor([loss, float(seen), elapsed] + [sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(totals)
        totals = totals.tolist()
        named = dict(zip(keys, totals[3:]))
        row = {"epoch": epoch, "train_loss": totals[0] / world,
               "samples_per_s": totals[1] / (totals[2] / world),
               "val_accuracy": named.get("accuracy", 0.0) / max(named.get("count", 0.0), 1.0)}
        history.append(row)
        if rank == 0:
            print(f"[{label}] epoch {epoch + 1}/{run.optim.epochs}  train_loss {row['train_loss']:.4f}  "
                  f"val_accuracy {row['val_accuracy']:.4f}  samples/s {row['samples_per_s']:,.0f}",
                  flush=True)
    if rank != 0:
        return None
    later = [h["samples_per_s"] for h in history[1:]] or [history[0]["samples_per_s"]]
    return {
        "history": history,
        "steady_samples_per_s": sum(later) / len(later),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "world": world,
        "loop": loop,
        "time_to_first_step_s": (first_step_at[0] - launched_at)
        if first_step_at and launched_at else None,
    }


def ray_train_worker(config: dict) -> None:
    """The same reference loop as the body of a Ray Train worker (the benchmark's `--ray-plain`).

    Gets the data as raydeep's allreduce does (`ray.get` of an object put by the driver) and
    wraps the model in DDP itself; the gloo group is Ray Train's. Rank 0 writes the figures
    to ``config["out"]``.
    """
    import ray
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    run = run_config.from_dict(config["run"])
    data = ray.get(config["data"])
    result = train(run, data, rank, world, config.get("loop", "plain"), label="ray+plain",
                   launched_at=config.get("submitted_at"))
    if result is not None:
        with open(config["out"], "w") as f:
            json.dump(result, f, indent=1)
    ray.train.report({"done": 1.0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="raydeep run config as JSON (RunConfig.to_dict())")
    parser.add_argument("--out", required=True, help="where rank 0 writes the result JSON")
    parser.add_argument("--loop", choices=("plain", "raydeep"), default="plain")
    parser.add_argument("--launched-at", type=float, default=None,
                        help="time.time() at launch, for the time to the first step")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(args.config) as f:
        run = run_config.from_dict(json.load(f))
    data = datasets.load(run.data, run.seed)
    result = train(run, data, rank, world, args.loop, launched_at=args.launched_at)
    if result is not None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()  # no rank leaves while another still talks to it (gloo aborts otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

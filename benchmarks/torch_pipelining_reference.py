"""The torch.distributed.pipelining side of `benchmarks/pipeline.py` (run under torchrun).

Same run config, same model and initial weights, same layer cut, same mini-batches; a
`PipelineStage` per process (V of them, stages rank, rank + P, ..., for interleaving; rank
and 2P - 1 - rank for ZB-V) and `ScheduleGPipe` / `Schedule1F1B` /
`ScheduleInterleavedZeroBubble` / `ScheduleInterleaved1F1B` / `ScheduleZBVZeroBubble`, gloo.
Prints one JSON line from the rank holding the loss: samples/s of each epoch (timed from the epoch's first step to its last).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
        ScheduleZBVZeroBubble,
    )

    from pipelines import config
    from pipelines import data as datasets
    from pipelines.training.loop import batch_indices, build_model, make_optimizer

    spec = json.loads(os.environ["RAYDEEP_PIPELINING"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = config.from_dict(spec["config"])
    data = datasets.load(run.data, run.seed)
    model = build_model(run, data)
    layers = model.pipeline_layers()
    v = spec.get("virtual_stages", 1)
    micro = run.data.batch_size // spec["microbatches"]
    stages, blocks = [], []
    held = [rank, 2 * world - 1 - rank] if spec["schedule"] == "zb-v" else range(rank, world * v, world)
    for index in held:  # model stages rank, rank + P, ... or, in a V, rank and 2P - 1 - rank
        a, b = spec["bounds"][index]
        block = nn.Sequential(*layers[a:b])
        example = data.x_train[:micro]
        with torch.no_grad():
            for layer in layers[:a]:
                example = layer(example)
        stages.append(PipelineStage(block, index, world * v, torch.device("cpu"), input_args=(example,)))
        blocks.append(block)
    loss = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731
    if spec["schedule"] == "zb-h1":  # torch's zero-bubble runtime with one stage per rank
        schedule = ScheduleInterleavedZeroBubble(stages, spec["microbatches"], loss_fn=loss)
    elif spec["schedule"] == "interleaved-1f1b":
        schedule = ScheduleInterleaved1F1B(stages, spec["microbatches"], loss_fn=loss)
    elif spec["schedule"] == "zb-v":
        schedule = ScheduleZBVZeroBubble(stages, spec["microbatches"], loss_fn=loss)
    else:
        schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[spec["schedule"]](
            stages[0], spec["microbatches"], loss_fn=loss)
    optimizer = make_optimizer(run.optim, [p for block in blocks for p in block.parameters()])
    rates = []
    for epoch in range(run.optim.epochs):
        began, samples = time.perf_counter(), 0
        for idx in batch_indices(len(data.y_train), run.data.batch_size, seed=run.seed, epoch=epoch,
                                 cap=run.optim.steps_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            if spec["schedule"] == "zb-v" and rank == 0:  # the V's first and last stages
                schedule.step(data.x_train[idx], target=data.y_train[idx])
            elif rank == 0:
                schedule.step(data.x_train[idx])
            elif rank == world - 1 and spec["schedule"] != "zb-v":
                schedule.step(target=data.y_train[idx])
            else:
                schedule.step()
            optimizer.step()
            samples += len(idx)
        rates.append(samples / (time.perf_counter() - began))
    if rank == (0 if spec["schedule"] == "zb-v" else world - 1):
        print(json.dumps({"samples_per_s": rates}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

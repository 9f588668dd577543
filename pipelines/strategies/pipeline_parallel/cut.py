"""Cutting a model into pipeline stages, balanced by measured cost.

A model that can be pipelined lists its layers (`pipeline_layers()`, whose composition is
its forward) and computes its loss from the last output (`output_loss`). Cuts go only
before a layer that holds parameters, so a stage never ends on a bare activation: the
layers between two such layers form one block. Each block's forward + backward is timed
on a micro-batch, and the blocks are split into P contiguous stages minimising the most
expensive stage (`split` overrides that with block indices where stages start).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


class CannotCut(ValueError):
    """The model cannot be cut as asked; the message says why in one line."""


@dataclass(frozen=True)
class Cut:
    bounds: tuple[tuple[int, int], ...]
    """[start, stop) layer indices of each stage."""
    costs: tuple[float, ...]
    """Measured forward+backward seconds of each stage on one micro-batch."""


def layers_of(model: nn.Module, name: str) -> list[nn.Module]:
    if not hasattr(model, "pipeline_layers") or not hasattr(model, "output_loss"):
        raise CannotCut(f"model {name} cannot be cut into pipeline stages: it has no "
                        "pipeline_layers() (the layers whose composition is its forward; an "
                        "nn.Sequential has them): add one, or train it with another strategy")
    return model.pipeline_layers()


def blocks(layers: list[nn.Module]) -> list[tuple[int, int]]:
    """[start, stop) of each block: a layer with parameters and the bare layers around it."""
    starts = [i for i, layer in enumerate(layers) if any(True for _ in layer.parameters())]
    if not starts:
        return [(0, len(layers))]
    starts[0] = 0  # leading bare layers (a Flatten) join the first block
    return list(zip(starts, starts[1:] + [len(layers)]))


def block_costs(layers: list[nn.Module], spans: list[tuple[int, int]], example: torch.Tensor,
                repeats: int = 5) -> list[float]:
    """Seconds of each block's forward + backward on `example` (a micro-batch): the fastest
    of `repeats` runs, as timeit takes. Other processes only ever add time to a run, so the
    minimum is the closest to the block's own cost (the median of 5 misjudged a cut once on a
    loaded machine)."""
    costs = []
    x = example
    for a, b in spans:
        block = nn.Sequential(*layers[a:b])
        times = []
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            began = time.perf_counter()
            out = block(inp)
            out.float().sum().backward()
            times.append(time.perf_counter() - began)
        block.zero_grad(set_to_none=True)
        costs.append(min(times))
        with torch.no_grad():
            x = block(x)
    return costs


def balanced_partition(costs: list[float], parts: int) -> list[int]:
    """Start indices of `parts` contiguous groups of `costs` minimising the largest sum."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest max-group cost splitting the first i items into k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], choice[k][i] = value, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = choice[k][i]
        starts.append(i)
    return starts[::-1]


def check(model: nn.Module, name: str, stages: int, split: list[int] | None = None,
          virtual: int = 1) -> list[tuple[int, int]]:
    """The model's blocks, once it is clear they can make `stages` stages (split as given);
    with `virtual` chunks per actor, `stages` counts the chunks of all actors."""
    spans = blocks(layers_of(model, name))
    if stages > len(spans):
        asked = (f"strategy.stages x virtual_stages ({stages // virtual} x {virtual} = {stages})"
                 if virtual > 1 else f"strategy.stages ({stages})")
        raise CannotCut(f"{asked} exceeds the {len(spans)} cuttable blocks of "
                        f"model {name} (a block is a layer with parameters and the bare layers after it)")
    if split is not None:
        starts = [0, *split]
        if len(starts) != stages or starts != sorted(set(starts)) or starts[-1] >= len(spans):
            raise CannotCut(f"strategy.split {split} must hold {stages - 1} increasing block indices "
                            f"in 1..{len(spans) - 1}")
    return spans


def cut(model: nn.Module, name: str, stages: int, example: torch.Tensor,
        split: list[int] | None = None, virtual: int = 1) -> Cut:
    """`stages` contiguous parts of balanced cost: with interleaving, the P x v chunks, each
    of about 1/(Pv) of the cost, so that each actor's v chunks hold about 1/P of it."""
    spans = check(model, name, stages, split, virtual)
    layers = model.pipeline_layers()
    was_training = model.training
    model.train()
    costs = block_costs(layers, spans, example)
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    starts = [0, *split] if split is not None else balanced_partition(costs, stages)
    ends = starts[1:] + [len(spans)]
    bounds = tuple((spans[a][0], spans[b - 1][1]) for a, b in zip(starts, ends))
    stage_costs = tuple(sum(costs[a:b]) for a, b in zip(starts, ends))
    return Cut(bounds, stage_costs)

"""The strategy interface and its registry.

A strategy moves tensors: it takes a run config, the data and a tracker, trains the model
the config names, and returns its final weights and per-epoch history. It never asks which
model it trains; the model's own ``loss``/``evaluate`` seams are all it uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

import models
from pipelines.config import RunConfig
from pipelines.data import Dataset


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]
    """Final weights, on the CPU."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-epoch metrics as logged."""
    summary: dict[str, float] = field(default_factory=dict)
    """Strategy-level figures for the final metrics (restarts, time to first step...)."""


class Strategy:
    """Base of every strategy; subclasses set the class attributes and implement `fit`."""

    name: str = ""
    config: type = type(None)
    """Dataclass of the strategy's own options (the `strategy` config section)."""
    description: str = ""
    uses_ray: bool = True
    bundles_in_trial: bool = True
    """Whether a Tune trial reserves `actor_bundles` in its own placement group (False where
    the strategy's framework reserves its workers itself, as Ray Train does)."""

    def actor_bundles(self, run: RunConfig) -> list[dict[str, float]]:
        """Resources of the actors this strategy starts beside its driver, one bundle each."""
        return []

    def validate(self, run: RunConfig) -> None:
        """Raise `ConfigError` for options this strategy cannot run with."""

    def check_model(self, run: RunConfig, model: nn.Module) -> None:
        """Raise `ConfigError` for options the built model cannot satisfy (checked before any
        process starts, once the data fixed the model's shape)."""

    def fit(self, run: RunConfig, data: Dataset, tracker, run_dir: Path) -> FitResult:
        raise NotImplementedError


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in _REGISTRY:
        raise ValueError(f"strategy {strategy.name!r} is registered twice")
    _REGISTRY[strategy.name] = strategy
    return strategy


def get(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def names() -> Sequence[str]:
    return sorted(_REGISTRY)


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise `ConfigError` with the message of the first check that failed."""
    from pipelines.config import ConfigError

    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def require_even_shards(run: RunConfig) -> None:
    """Data-parallel strategies split every global batch evenly over their workers."""
    from pipelines.config import ConfigError

    workers, batch = run.resources.workers, run.data.batch_size
    if batch % workers:
        raise ConfigError(
            f"data.batch_size ({batch}) must be divisible by resources.workers ({workers}): "
            "each worker takes an equal shard of every global batch")


def build_model(run: RunConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The run's model with initial weights fixed by the run's seed."""
    spec = models.get(run.model.name)
    torch.manual_seed(run.seed)
    return spec.build(run.model.params, tuple(input_shape), num_classes)


def worker_bundle(run: RunConfig) -> dict[str, float]:
    """The resources of one worker actor as the run's `resources` section asks."""
    bundle = {"CPU": run.resources.cpus_per_worker}
    if run.resources.gpus_per_worker > 0:
        bundle["GPU"] = run.resources.gpus_per_worker
    return bundle

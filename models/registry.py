"""The model registry: each family registers one `ModelSpec` under a unique name.

Models are pure PyTorch and know nothing of Ray or of the strategy that trains them.
A built module offers the seams every strategy relies on:

- ``loss(batch) -> Tensor``: the training objective for one batch (a tuple of tensors);
- ``evaluate(batch) -> dict[str, Tensor]``: per-example metric *sums* plus ``count``,
  so a strategy can add them up across batches and workers before dividing (a sequence
  model's ``*_per_step`` sums are divided by its ``steps`` sum, the observed steps);
- ``predict(x) -> Tensor`` (supervised models): the predicted class of each example, or its
  predicted target for a model that regresses (``regress(mean, std)``, `models.targets`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One model family: its name, its hyper-parameters and how to build it."""

    name: str
    config: type
    """A dataclass of the family's hyper-parameters; every field has a default."""
    build: Callable[..., nn.Module]
    """``build(config, input_shape, num_classes) -> nn.Module``."""
    description: str = ""
    sequences: bool = False
    """Trains on sequences: batches of (x of shape (N, T, ...), mask of observed steps (N, T))."""

    def hyper_parameters(self) -> dict[str, object]:
        """The family's hyper-parameters and their defaults."""
        return {f.name: _default(f) for f in dataclasses.fields(self.config)}


def _default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown model {name!r} (known: {known})") from None


def names() -> Sequence[str]:
    return sorted(_REGISTRY)

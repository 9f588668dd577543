"""The strategy registry: names to strategies, loaded when first asked for.

A leaf: it imports nothing of raydeep's at import time, so the config schema can look a
strategy's options up without importing the strategies (which import the schema). The
built-in strategies are named here by module and imported on first use; importing a
strategy's module registers it. A user's own strategy calls `register` itself.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

BUILTIN = {
    "local": "pipelines.strategies.local",
    "allreduce": "pipelines.strategies.allreduce",
    "ps": "pipelines.strategies.ps.strategy",
    "pipeline": "pipelines.strategies.pipeline_parallel.strategy",
    "lbfgs": "pipelines.strategies.lbfgs.strategy",
    "diloco": "pipelines.strategies.diloco.strategy",
}
"""Built-in strategy name -> the module whose import registers it."""

_REGISTRY: dict[str, Any] = {}


def register(strategy: Any) -> Any:
    """Make `strategy` (a `pipelines.strategies.base.Strategy`) known by its `name`."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"strategy {strategy.name!r} is registered twice")
    _REGISTRY[strategy.name] = strategy
    return strategy


def get(name: str) -> Any:
    """The strategy registered as `name`; KeyError naming the known ones otherwise."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r} (known: {', '.join(names())})") from None


def names() -> Sequence[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))

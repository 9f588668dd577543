"""How it trains: the run config, data, strategies, tracking, sweeps.

Top level: the run's config, data, storage, context and tracking, and `train`; `training/`
holds what strategies share (step loop, epochs, flat parameters, placement); `strategies/`
holds one module or package per strategy (the `pipeline` strategy is
`strategies/pipeline_parallel/`); `sweep/` holds Ray Tune sweeps. `registry` names them.

    from pipelines import config, train
    result = train(config.load(overrides={"model.name": "cnn", "strategy.name": "local"}))

The names below are imported when first used, so that `import pipelines.errors` (the
command line's `jobs`, `ui`) does not pay for torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"ConfigError": "pipelines.config", "RunConfig": "pipelines.config", "load": "pipelines.config",
            "Result": "pipelines.run", "RunFailed": "pipelines.run", "train": "pipelines.run"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")

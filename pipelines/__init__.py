"""How it trains: the run config, data, strategies, tracking, sweeps.

Top level: the run's config, data, storage, context and tracking, and `train`; `training/`
holds what strategies share (step loop, epochs, flat parameters, placement); `strategies/`
holds one module or package per strategy (the `pipeline` strategy is
`strategies/pipeline_parallel/`); `sweep/` holds Ray Tune sweeps. `registry` names them.

    from pipelines import config, train
    result = train(config.load(overrides={"model.name": "cnn", "strategy.name": "local"}))
"""
from pipelines.config import ConfigError, RunConfig, load
from pipelines.run import Result, RunFailed, train

__all__ = ["ConfigError", "Result", "RunConfig", "RunFailed", "load", "train"]

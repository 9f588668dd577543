"""How it trains: the run config, data, strategies, tracking.

    from pipelines import config, train
    result = train(config.load(overrides={"model.name": "cnn", "strategy.name": "local"}))
"""
from pipelines import allreduce, lbfgs, local, param_server, pipeline  # noqa: F401  (each registers its strategy)
from pipelines.config import ConfigError, RunConfig, load
from pipelines.run import Result, RunFailed, train

__all__ = ["ConfigError", "Result", "RunConfig", "RunFailed", "load", "train"]

"""The strategy interface.

A strategy moves tensors: it takes a run config, the data and the run's context, trains
the model the config names, and returns its final weights and per-epoch history. It never
asks which model it trains; the model's own ``loss``/``evaluate``/``pipeline_layers``
seams are all it uses. Strategies are registered by name in `pipelines.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.config import ConfigError, RunConfig
from pipelines.data import Dataset


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]
    """Final weights, on the CPU."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-epoch metrics as logged."""
    summary: dict[str, float] = field(default_factory=dict)
    """Strategy-level figures for the final metrics (restarts, time to first step...)."""
    stopping: dict | None = None
    """The early-stopping watcher's final state where the strategy's workers kept it
    (allreduce's); None: the driver's `RunContext.stopping` kept it, if anyone did."""


class Strategy:
    """Base of every strategy; subclasses set the class attributes and implement `fit`."""

    name: str = ""
    options: type = type(None)
    """Dataclass of the strategy's own options: the `strategy` config section beside `name`
    (`run.strategy.options`)."""
    description: str = ""
    uses_ray: bool = True
    streams: bool = False
    """Whether it trains on a streamed table (`data.stream`: `fit` takes its batches from
    `pipelines.streaming.Streamed` rather than from `Dataset.x_train`)."""
    sends_over_link: bool = False
    """Whether its workers' exchanges wait on `resources.link_mbps` (`training.link`)."""
    bundles_in_trial: bool = True
    """Whether a Tune trial reserves `actor_bundles` in its own placement group (False where
    the strategy's framework reserves its workers itself, as Ray Train does)."""
    needs_dashboard: bool = False
    """Whether an embedded Ray must run its dashboard for this strategy: besides the web page
    it serves Ray's state API, which Ray Train's placement-group cleaner polls. Without it
    Ray starts 11 fewer processes (about 1.4 s of CPU before the first step on 2 cores)."""

    def needs_ray(self, run: RunConfig) -> bool:
        """Whether this run needs Ray: a streamed table is read by Ray Data."""
        return self.uses_ray or run.data.stream

    def actor_bundles(self, run: RunConfig) -> list[dict[str, float]]:
        """Resources of the actors this strategy starts beside its driver, one bundle each."""
        return []

    def validate(self, run: RunConfig) -> None:
        """Raise `ConfigError` for options this strategy cannot run with."""

    def check_model(self, run: RunConfig, model: nn.Module, data: Dataset) -> None:
        """Raise `ConfigError` for options the built model cannot satisfy on this data
        (checked before any process starts, once the data fixed the model's shape)."""

    def describe(self, run: RunConfig) -> str:
        """What this run would do, without training (`raydeep run --print-schedule`)."""
        raise ConfigError(f"--print-schedule needs a strategy with a schedule (--strategy pipeline), "
                          f"got {self.name!r}")

    def fit(self, run: RunConfig, data: Dataset, context) -> FitResult:
        """Train; `context` (`pipelines.context.RunContext`) ends each epoch and owns the
        run's storage and tracking."""
        raise NotImplementedError


WORKER_FAILURE_MODES = ("replace", "continue")
"""What a strategy of its own actors does when a worker dies (`strategy.on_worker_failure`):
start a new one, or go on with the rest."""


def worker_failure_checks(options) -> list[tuple[bool, str]]:
    """The checks of `on_worker_failure` and `max_worker_restarts`, for `require`."""
    return [(options.on_worker_failure in WORKER_FAILURE_MODES,
             f"strategy.on_worker_failure must be replace or continue, got {options.on_worker_failure!r}"),
            (options.max_worker_restarts >= -1,
             f"strategy.max_worker_restarts must be >= -1, got {options.max_worker_restarts}")]


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise `ConfigError` with the message of the first check that failed."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def require_even_shards(run: RunConfig) -> None:
    """Data-parallel strategies split every global batch evenly over their workers."""
    workers, batch = run.resources.workers, run.data.batch_size
    if batch % workers:
        raise ConfigError(
            f"data.batch_size ({batch}) must be divisible by resources.workers ({workers}): "
            "each worker takes an equal shard of every global batch")


def require_shards_hold_parameters(run: RunConfig, model: nn.Module) -> None:
    """Strategies that split the flat parameter vector over `strategy.shards` servers."""
    from pipelines.training.flat import trainable

    shards = run.strategy.options.shards
    numel = sum(p.numel() for p in trainable(model))
    if shards > numel:
        raise ConfigError(f"strategy.shards ({shards}) exceeds the {numel:,} trainable "
                          f"parameters of model {run.model.name}: a shard would hold nothing")

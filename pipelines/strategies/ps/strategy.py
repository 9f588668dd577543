"""`ps`: asynchronous parameter-server SGD on Ray actors (DistBelief's Downpour).

S shard actors (`shard`) hold equal slices of the flat parameter vector with their own
optimizer state; W worker actors (`worker`) train model replicas on disjoint data
shards and push gradients to / pull parameters from the shards directly, each on its own
clock. A staleness bound K (stale-synchronous parallel; K = 0 is synchronous) is kept by
a small coordinator actor (`coordinator`). The driver (`driver`) only starts the actors,
watches them, replaces a worker that dies, logs each epoch from the shards' current
parameters, checkpoints, and assembles the final model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from pipelines.config import RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.registry import register
from pipelines.strategies.base import (
    FitResult,
    Strategy,
    require,
    require_even_shards,
    require_shards_hold_parameters,
    worker_failure_checks,
)
from pipelines.strategies.ps.driver import Downpour
from pipelines.training import placement
from pipelines.training.placement import worker_bundle


@dataclass
class ParameterServerOptions:
    shards: int = 1
    """Server shards (`--shards`); the parameters are split evenly by size."""
    staleness: Optional[int] = None
    """Max clocks a worker may run ahead of the slowest (`--staleness`); unset: fully async."""
    n_fetch: int = 1
    """Steps between pulls of fresh parameters."""
    n_push: int = 1
    """Steps whose gradients are accrued before each push."""
    staleness_aware_lr: bool = False
    """Divide the learning rate of each update by its staleness + 1."""
    overlap: bool = False
    """Fully async only: compute the next gradient while the last push/pull is in flight
    (more throughput, one more step of staleness: with momentum it costs accuracy)."""
    push_dtype: str = "float32"
    """Gradients on the wire: float32, or bfloat16 (half the bytes, about 3 significant digits)."""
    device: str = "cpu"
    """Where the shards keep parameters and optimizer state (`--ps-device`): cpu or cuda."""
    shard_cpus: float = 0.0
    """CPUs reserved per shard (0: shards share the workers' cores; on a cluster, say 1)."""
    shard_gpus: float = 0.0
    """GPU fraction per shard when `device` is cuda."""
    snapshot_every: int = 200
    """Updates between a shard's snapshots: a restarted shard loses at most this many."""
    on_worker_failure: str = "replace"
    """replace (a new worker resumes the dead one's data) or continue (with the rest)."""
    max_worker_restarts: int = 3
    """Worker replacements before the run fails; -1: no limit."""


class ParameterServerStrategy(Strategy):
    name = "ps"
    sends_over_link = True
    streams = True
    options = ParameterServerOptions
    description = "asynchronous parameter server (Downpour): sharded servers, bounded staleness"

    def validate(self, run: RunConfig) -> None:
        o: ParameterServerOptions = run.strategy.options
        require_even_shards(run)
        checks = [
            (o.shards >= 1, f"strategy.shards must be >= 1, got {o.shards}"),
            (o.staleness is None or o.staleness >= 0,
             f"strategy.staleness must be >= 0 (or unset for fully asynchronous), got {o.staleness}"),
            (o.n_fetch >= 1, f"strategy.n_fetch must be >= 1, got {o.n_fetch}"),
            (run.optim.accumulate == 1, "ps workers push each batch's gradient: accumulate them with "
                                        "strategy.n_push (pushes every n steps) instead of optim.accumulate"),
            (run.optim.precision != "fp16", "ps workers push gradients with no loss scale for the shards to "
                                            "undo: optim.precision fp16 is refused under ps, use bf16"),
            (run.optim.early_stopping.metric is None,
             "ps workers run their epochs on their own clocks, with no epoch end to stop all of them at: "
             "optim.early_stopping works under local, allreduce, pipeline, lbfgs and diloco (drop it)"),
            (run.optim.schedule != "plateau",
             "ps shards apply pushes on the workers' own clocks, with no epoch end to judge a plateau at: "
             "optim.schedule plateau works under local, allreduce and pipeline (use cosine or step)"),
            (o.n_push >= 1, f"strategy.n_push must be >= 1, got {o.n_push}"),
            (o.push_dtype in ("float32", "bfloat16"),
             f"strategy.push_dtype must be float32 or bfloat16, got {o.push_dtype!r}"),
            (o.device in ("cpu", "cuda"), f"strategy.device must be cpu or cuda, got {o.device!r}"),
            (o.device == "cpu" or o.shard_gpus > 0,
             "strategy.device cuda needs strategy.shard_gpus > 0 (e.g. 0.25)"),
            (o.shard_cpus >= 0 and o.shard_gpus >= 0, "strategy.shard_cpus/shard_gpus must be >= 0"),
            (o.snapshot_every >= 1, f"strategy.snapshot_every must be >= 1, got {o.snapshot_every}"),
            *worker_failure_checks(o),
            # Shards with resources of their own may run on other nodes, and read and write
            # their snapshots under the run's directory: that needs a path every node mounts.
            ("://" not in run.resources.storage_path or (o.shard_cpus == 0 and o.shard_gpus == 0),
             "strategy.shard_cpus/shard_gpus place shards on other nodes, whose snapshots need a "
             "shared path (NFS with resources.shared_storage), not an object store; keep them 0 "
             "(shards on the driver's node) or use a shared path"),
        ]
        require(checks)

    def actor_bundles(self, run: RunConfig) -> list[dict[str, float]]:
        o: ParameterServerOptions = run.strategy.options
        shard = {k: v for k, v in (("CPU", o.shard_cpus), ("GPU", o.shard_gpus)) if v > 0}
        return [worker_bundle(run)] * run.resources.workers + ([shard] * o.shards if shard else [])

    def check_model(self, run: RunConfig, model: nn.Module, data: Dataset) -> None:
        require_shards_hold_parameters(run, model)

    def fit(self, run: RunConfig, data: Dataset, context: RunContext) -> FitResult:
        labels = ([f"worker-{i}" for i in range(run.resources.workers)]
                  + [f"shard-{i}" for i in range(run.strategy.options.shards)])
        with placement.reserve(self, run, context.say, labels) as place:
            context.tracker.startup("placement")
            return Downpour(run, data, context, place).train()



register(ParameterServerStrategy())

"""`diloco`: workers take H local steps between synchronisations; an outer optimizer moves
the global parameters by the workers' averaged pseudo-gradient (DiLoCo: Douillard et al.
2023, "DiLoCo: Distributed Low-Communication Training of Language Models").

One strategy covers the family: plain model averaging (post-local SGD, PyTorch's
`PeriodicModelAverager`) is outer SGD at lr 1 without momentum, and DiLoCo proper is outer
Nesterov momentum. The paper's outer lr 0.7 and momentum 0.9 serve inner AdamW on language
models with H = 500; over raydeep's inner SGD with momentum 0.9 on digits (H = 16, 10
epochs, one run each) they gave MLP 0.967 and CNN 0.956, momentum 0.5 gave 0.975 and 0.986
(plain averaging 0.975 and 0.992): the default here is lr 0.7 with Nesterov momentum 0.5.
With H = 1 and plain averaging, SGD takes `allreduce`'s (and `local`'s) steps, momentum
included: each worker's buffer is linear in its gradients and averages to allreduce's (Adam's
is not).

The pseudo-gradients are averaged by the driver, which holds the global parameters and
the outer optimizer's state (`driver`), from the workers' answers through Ray's object
store: rare synchronisations make that exchange cheap, and a worker lost mid-round is then
only left out of one average instead of breaking a collective process group.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.registry import register
from pipelines.strategies.base import FitResult, Strategy, require, require_even_shards, worker_failure_checks
from pipelines.strategies.diloco.driver import DiLoCo
from pipelines.training import placement
from pipelines.training.placement import worker_bundle


@dataclass
class DiLoCoOptions:
    sync_every: int = 16
    """Inner steps between synchronisations, H (`--sync-every`); longer than an epoch,
    rounds span whole epochs (`plan`)."""
    outer_lr: float = 0.7
    """The outer optimizer's learning rate (`--outer-lr`): 1 with no momentum averages the models."""
    outer_momentum: float = 0.5
    """The outer optimizer's momentum (`--outer-momentum`)."""
    nesterov: bool = True
    """Nesterov momentum for the outer step (the paper's), when there is momentum."""
    push_dtype: str = "float32"
    """Pseudo-gradients on the wire: float32, or bfloat16 (half the bytes)."""
    on_worker_failure: str = "replace"
    """replace (a new worker joins the next round) or continue (without it)."""
    max_worker_restarts: int = 3
    """Worker replacements before the run fails; -1: no limit."""


class DiLoCoStrategy(Strategy):
    name = "diloco"
    sends_over_link = True
    streams = True  # every worker reads the whole stream and keeps its share (`worker._rows`)
    options = DiLoCoOptions
    description = "local SGD with an outer optimizer (DiLoCo): H local steps per synchronisation"

    def validate(self, run: RunConfig) -> None:
        o: DiLoCoOptions = run.strategy.options
        require_even_shards(run)
        require([
            (o.sync_every >= 1, f"strategy.sync_every must be >= 1, got {o.sync_every}"),
            (run.optim.accumulate == 1, "diloco's rounds count inner steps of one batch each: raise "
                                        "data.batch_size instead of optim.accumulate"),
            (o.outer_lr > 0, f"strategy.outer_lr must be > 0, got {o.outer_lr}"),
            (0 <= o.outer_momentum < 1, f"strategy.outer_momentum must be in [0, 1), got {o.outer_momentum}"),
            (o.push_dtype in ("float32", "bfloat16"),
             f"strategy.push_dtype must be float32 or bfloat16, got {o.push_dtype!r}"),
            (run.optim.schedule != "plateau",
             "diloco validates only where a round ends with an epoch, not after every epoch: "
             "optim.schedule plateau works under local, allreduce and pipeline (use cosine or step)"),
            *worker_failure_checks(o),
        ])

    def actor_bundles(self, run: RunConfig) -> list[dict[str, float]]:
        return [worker_bundle(run)] * run.resources.workers

    def fit(self, run: RunConfig, data: Dataset, context: RunContext) -> FitResult:
        labels = [f"worker-{i}" for i in range(run.resources.workers)]
        with placement.reserve(self, run, context.say, labels) as place:
            context.tracker.startup("placement")
            return DiLoCo(run, data, context, place).train()


register(DiLoCoStrategy())

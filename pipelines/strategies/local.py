"""`local`: the single-process reference loop that every distributed strategy must match."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.registry import register
from pipelines.strategies.base import FitResult, Strategy
from pipelines.training.epochs import Collective, driver_rows, train_epochs


@dataclass
class LocalOptions:
    """The local loop has no options of its own."""


class LocalStrategy(Strategy):
    name = "local"
    options = LocalOptions
    description = "single process, no Ray (but Ray Data for a streamed table): the reference every strategy is tested against"
    uses_ray = False
    streams = True

    def fit(self, run: RunConfig, data: Dataset, context: RunContext) -> FitResult:
        summary: dict[str, float] = {}

        def after_epoch(epoch, metrics, model, optimizer):
            context.epoch_done(epoch, metrics, model=model.state_dict(), optimizer=optimizer.state_dict())
            return context.should_stop

        def first_step():
            seconds = context.tracker.first_step()
            if seconds is not None:
                summary["time_to_first_step_s"] = seconds

        state = context.resume_state()
        # Time to first step is a fresh run's figure, in every strategy (allreduce cannot
        # tell a resumed run from a worker group restarted from a checkpoint).
        source = driver_rows(run, data) if data.stream is not None else None  # Ray Data, here
        model = train_epochs(run, data, context.tracker, Collective(), state, after_epoch,
                             None if state else first_step, source)
        return FitResult({k: v.detach().cpu() for k, v in model.state_dict().items()},
                         context.history, summary)


register(LocalStrategy())

"""`local`: the single-process reference loop that every distributed strategy must match."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines import checkpoint
from pipelines.config import RunConfig
from pipelines.data import Dataset
from pipelines.epochs import Collective, train_epochs
from pipelines.strategy import FitResult, Strategy, register


@dataclass
class LocalOptions:
    """The local loop has no options of its own."""


class LocalStrategy(Strategy):
    name = "local"
    config = LocalOptions
    description = "single process, no Ray: the reference every strategy is tested against"
    uses_ray = False

    def fit(self, run: RunConfig, data: Dataset, tracker, run_dir: Path) -> FitResult:
        history: list[dict] = []
        summary: dict[str, float] = {}

        def after_epoch(epoch, metrics, model, optimizer):
            saved = checkpoint.save(run_dir / checkpoint.directory_name(epoch), epoch=epoch,
                                    model=model.state_dict(), optimizer=optimizer.state_dict())
            history.append(metrics)
            tracker.checkpointed(epoch, metrics, saved)

        def first_step():
            seconds = tracker.first_step()
            if seconds is not None:
                summary["time_to_first_step_s"] = seconds

        state = checkpoint.load_latest(run_dir) if run.resume else None
        # Time to first step is a fresh run's figure, in every strategy (allreduce cannot
        # tell a resumed run from a worker group restarted from a checkpoint).
        model = train_epochs(run, data, tracker, Collective(), state, after_epoch,
                             None if state else first_step)
        return FitResult({k: v.detach().cpu() for k, v in model.state_dict().items()}, history,
                         summary)


register(LocalStrategy())

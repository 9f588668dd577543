"""`RunContext`: what a strategy's driver is handed besides the config and the data.

It owns the run's tracker (MLflow), its directory (`pipelines.storage.RunDir`) and, in a
Tune trial, the trial's reporter, and it ends every epoch the same way for every strategy
(`epoch_done`): checkpoint first (saved, uploaded to an object store, older ones pruned),
then the metrics that describe it are logged and, in a trial, reported to Tune with it. A
crash between the two loses no state a logged metric speaks of, and the checkpoint holds
the metrics (`epoch_record`): a run restarted from it logs what the store did not get.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipelines.config import RunConfig
from pipelines.storage import RunDir
from pipelines.tracking import Tracker, now_ms
from pipelines.training.early_stopping import STATE_KEY, EarlyStopping


class EpochReporter(Protocol):
    """Where a Tune trial's epochs go (`pipelines.sweep.trial.TuneReporter`)."""

    def epoch_done(self, epoch: int, metrics: dict[str, float], checkpoint: Path) -> None: ...

    def ray_train_callback(self) -> Any:
        """The same reports for a strategy whose epochs end inside Ray Train's workers."""


@dataclass
class RunContext:
    run: RunConfig
    tracker: Tracker
    run_dir: RunDir
    reporter: EpochReporter | None = None
    """Set in a Tune trial."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Metrics of the epochs ended through `epoch_done`, in order."""
    stopping: EarlyStopping | None = None
    """Watches `optim.early_stopping.metric` over the epochs ended through `epoch_done`."""

    def __post_init__(self) -> None:
        if self.stopping is None:
            self.stopping = EarlyStopping(self.run.optim.early_stopping)

    @property
    def should_stop(self) -> bool:
        """The watched metric stopped improving: the strategy ends after this epoch."""
        return self.stopping.stopped

    def say(self, line: str) -> None:
        self.tracker.say(line)

    def resume_state(self) -> dict[str, Any] | None:
        """The state a `--resume`d run (or a restored trial) continues from, if any."""
        return self.newest_state() if self.run.resume else None

    def newest_state(self) -> dict[str, Any] | None:
        """The newest whole checkpoint of this run (a strategy's restart after a failure);
        the metrics of its epoch are logged if a crash came between the two."""
        state = self.run_dir.newest_state()
        log_saved_metrics(self.tracker, state)
        if state and STATE_KEY in state.get("extra", {}):  # a resumed run goes on judging where it left off
            self.stopping = EarlyStopping(self.run.optim.early_stopping, state["extra"][STATE_KEY])
        return state

    def epoch_done(self, epoch: int, metrics: dict[str, float], *, model: dict, optimizer: dict,
                   extra: dict[str, Any] | None = None) -> Path:
        """Epoch `epoch` (0-based) ended in this state with these metrics. The checkpoint
        holds the metrics too: a crash before they are logged loses neither."""
        record = epoch_record(self.tracker, metrics)
        self.stopping.update(epoch, metrics, lambda: model)  # its state goes in this checkpoint
        saved = self.run_dir.save_checkpoint(epoch, model=model, optimizer=optimizer,
                                             extra={**(extra or {}), **record, **self.stopping.checkpoint_extra()})
        self.tracker.log_epoch(epoch, metrics, timestamp=record["logged_at"])
        self.history.append(metrics)
        if self.reporter is not None:
            self.reporter.epoch_done(epoch, metrics, saved)
        return saved

    def epoch_logged(self, epoch: int, metrics: dict[str, float]) -> None:
        """Epoch `epoch` ended where the strategy has no state to save (inside one of
        diloco's rounds that span epochs): logged and kept in the history, but neither
        checkpointed, watched by early stopping, nor reported to a Tune trial."""
        self.tracker.log_epoch(epoch, metrics, timestamp=now_ms())
        self.history.append(metrics)


def epoch_record(tracker: Tracker, metrics: dict[str, float]) -> dict[str, Any]:
    """What a checkpoint holds of the tracking: its epoch's metrics, the time they are
    logged at, and every metric this process has not got into the store yet (the store is
    away: earlier epochs, whose own checkpoints may be pruned by now)."""
    return {"metrics": metrics, "logged_at": now_ms(), "unlogged": tracker.unlogged()}


def log_saved_metrics(tracker: Tracker, state: dict[str, Any] | None) -> None:
    """Log the metrics a checkpoint holds that the store may have missed: the run stopped
    between saving the checkpoint and logging what it describes, or ended while the store
    was away. Each is logged with the timestamp it was first logged at, so one the store
    has already is not added again (`Tracker.log_rows`)."""
    extra = (state or {}).get("extra") or {}
    metrics = extra.get("metrics")
    if not metrics:
        return
    if "logged_at" in extra:
        stamp, step = extra["logged_at"], state["epoch"]
        tracker.log_rows([*extra.get("unlogged", []), *((k, v, stamp, step) for k, v in metrics.items())])
    elif state["epoch"] not in tracker.logged_steps("train_loss"):  # a checkpoint of an older raydeep
        tracker.log_metrics(metrics, step=state["epoch"])

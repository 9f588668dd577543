"""One Tune trial: the chosen strategy trained with the trial's config, as `raydeep run` would.

The trial's process is the strategy's driver (Ray Train V2's pattern): `allreduce` starts a
`TorchTrainer` whose reports reach Tune through `TuneReportCallback`; `local`, `ps` and
`pipeline` report each checkpointed epoch from here, their actors placed in the trial's
placement group. A trial that Tune restores (a resumed sweep, PBT's exploit) starts from
the checkpoint Tune hands it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.storage import RunDir, checkpoint_name
from pipelines.sweep.config import SweepConfig
from pipelines.sweep.record import PARAMS_TAG, SweepRecord


@dataclass
class TrialContext:
    """What every trial of one sweep shares (travels once through the object store)."""

    sweep: SweepConfig
    uri: str
    parent_run_id: str
    runs_dir: str
    """Each trial's run directory (checkpoints, strategy state) is `runs_dir/<trial id>`."""


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    from ray import tune

    from pipelines.context import RunContext
    from pipelines.run import RunFailed, prepare, run_tags, train

    for name in ("ray.train", "ray.tune"):  # one line per saved checkpoint would bury the table
        logging.getLogger(name).setLevel(logging.WARNING)
    trial = tune.get_context()
    record = SweepRecord.attach(context.uri, context.parent_run_id, context.sweep.name)
    decoded = context.sweep.decoded(params)
    tags = {PARAMS_TAG: json.dumps(context.sweep.flat_params(params)),
            **{f"space.{k}": str(v) for k, v in decoded.items()}}
    try:
        run = context.sweep.run_config(params)
        run.tracking.run_name = trial.get_trial_name()
        data, _ = prepare(run)
    except ConfigError as e:  # a point of the space that cannot run: a FAILED child, not a crash
        tracker = record.child(trial.get_trial_id(), trial.get_trial_name(),
                               {f"space.{k}": v for k, v in decoded.items()}, tags, 0)
        tracker.finish("FAILED", str(e))
        raise
    tracker = record.child(trial.get_trial_id(), trial.get_trial_name(), run.flat(),
                           {**run_tags(run, data), **tags}, run.optim.epochs)
    tracker.echo = False  # Tune's table is the progress display
    run_dir = RunDir(trial.get_trial_id(), Path(context.runs_dir) / trial.get_trial_id(),
                     keep=run.resources.keep_checkpoints)
    try:
        run_dir.local.mkdir(parents=True, exist_ok=True)
        given = tune.get_checkpoint()
        if given is not None:  # a resumed sweep, or PBT's exploit: Tune's copy wins
            with given.as_directory() as directory:
                run_dir.adopt(Path(directory))
            run.resume = run_dir.name
    except Exception as e:
        tracker.finish("FAILED", f"cannot restore the trial's checkpoint: {type(e).__name__}: {e}")
        raise
    try:
        result = train(run, data, context=RunContext(run, tracker, run_dir, TuneReporter(run.optim.epochs)))
    except RunFailed as e:  # the child is FAILED with the reason; Tune records the error
        raise RuntimeError(str(e)) from None
    last = run.optim.epochs - 1
    saved = run_dir.local / checkpoint_name(last)
    # done: the run is over, so no scheduler acts on this report (PBT would clone a finished
    # run into this trial again and again).
    tune.report({**(result.history[-1] if result.history else {}), **result.metrics, "epoch": last + 1,
                 "done": True},
                checkpoint=tune.Checkpoint.from_directory(str(saved)) if saved.is_dir() else None)


class TuneReporter:
    """Reports a trial's epochs to Tune, each with its checkpoint: the report that lets a
    scheduler stop the trial (ASHA) or restore another from it (PBT).

    The last epoch is held back: the trial reports it once the run is complete (test
    metrics, figures), so that a scheduler that stops trials at their last epoch cannot cut
    the run short.
    """

    def __init__(self, epochs: int):
        self.epochs = epochs

    def is_last(self, epoch: int) -> bool:
        return epoch >= self.epochs - 1

    def epoch_done(self, epoch: int, metrics: dict[str, float], checkpoint: Path) -> None:
        from ray import tune

        if not self.is_last(epoch):
            tune.report({**metrics, "epoch": epoch + 1},
                        checkpoint=tune.Checkpoint.from_directory(str(checkpoint)))

    def ray_train_callback(self):
        """Ray Train's `TuneReportCallback`, holding the last epoch back in the same way."""
        from ray.tune.integration.ray_train import TuneReportCallback

        reporter = self

        class EpochsToTune(TuneReportCallback):
            def after_report(self, run_context, metrics, checkpoint):
                if not reporter.is_last(metrics[0]["epoch"] - 1):
                    super().after_report(run_context, metrics, checkpoint)

        return EpochsToTune()

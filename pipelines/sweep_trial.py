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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import checkpoint
from pipelines.config import ConfigError
from pipelines.sweep_config import SweepConfig
from pipelines.sweep_tracking import PARAMS_TAG, SweepRecord


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
    tracker.report_to_tune = True
    run_dir = Path(context.runs_dir) / trial.get_trial_id()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        given = tune.get_checkpoint()
        if given is not None:
            with given.as_directory() as directory:
                _adopt(Path(directory), run_dir)
            run.resume = run_dir.name
    except Exception as e:
        tracker.finish("FAILED", f"cannot restore the trial's checkpoint: {type(e).__name__}: {e}")
        raise
    try:
        result = train(run, data, tracker=tracker, run_dir=run_dir)
    except RunFailed as e:  # the child is FAILED with the reason; Tune records the error
        raise RuntimeError(str(e)) from None
    last = run.optim.epochs - 1
    saved = run_dir / checkpoint.directory_name(last)
    # done: the run is over, so no scheduler acts on this report (PBT would clone a finished
    # run into this trial again and again).
    tune.report({**(result.history[-1] if result.history else {}), **result.metrics, "epoch": last + 1,
                 "done": True},
                checkpoint=tune.Checkpoint.from_directory(str(saved)) if saved.is_dir() else None)


def _adopt(given: Path, run_dir: Path) -> None:
    """Make the checkpoint Tune handed over the newest state of this trial's run.

    Tune's copy is the directory a strategy wrote (or, for allreduce, the one Ray Train
    stored); any later state of this trial's own is dropped: after PBT's exploit the trial
    continues from the other trial's weights, not its own.
    """
    state = checkpoint.load(given)
    for old in run_dir.glob("checkpoint_epoch_*"):
        shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(given, run_dir / checkpoint.directory_name(state["epoch"]))

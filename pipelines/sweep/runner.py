"""`run_sweep(sweep) -> SweepResult`: a Ray Tune sweep of one sweep file, recorded in MLflow.

A sweep lives in `<storage_path>/sweeps/<name>/`: Tune's experiment state (`tune/`), each
trial's run directory (`runs/<trial id>/`), the sweep's own record (`raydeep_sweep.json`,
which `--resume` reads to continue the same MLflow parent run) and, at the end, the best
trial's config as a YAML file that `raydeep run` takes as it is. On an object store, Tune
keeps its state there and the record and best config are uploaded; the rest stays in a
local staging directory.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from pipelines import figures, registry
from pipelines.config import ConfigError, RunConfig
from pipelines.errors import redact
from pipelines.storage import SWEEP_FILE, Store, timestamped
from pipelines.sweep.averaging import Configuration, described, ranked_configurations
from pipelines.sweep.config import SweepConfig
from pipelines.sweep.record import PARAMS_TAG, SweepRecord
from pipelines.sweep.trial import TrialContext, run_trial
from pipelines.tracking import Tracker, absolute_uri
from pipelines.training.placement import total


@dataclass
class TrialOutcome:
    trial_id: str
    name: str
    status: str
    """FINISHED, FAILED, KILLED (stopped by the scheduler) or RUNNING (interrupted)."""
    params: dict[str, Any]
    """The trial's sampled values as Tune gave them (lists and sections as YAML text)."""
    metric: float | None
    epochs: int
    run_id: str
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    directory: Path
    parent_run_id: str
    metric: str
    mode: str
    trials: list[TrialOutcome] = field(default_factory=list)
    best: TrialOutcome | None = None
    best_config: Path | None = None
    interrupted: bool = False
    configurations: list[Configuration] = field(default_factory=list)
    """With `seeds`: the configurations, best first (`best` is the best one's best seed)."""
    best_said: str = ""
    """How the best was judged: `val_loss 0.1440`, or its mean over the seeds."""

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)


def run_sweep(sweep: SweepConfig, resume: str | None = None) -> SweepResult:
    """Run (or, with `resume`, finish) the sweep; trials that fail are recorded, not raised."""
    import ray

    problem = trial_shortfall(sweep, ray.cluster_resources())
    if problem:  # before anything is recorded
        raise ConfigError(problem)
    base = sweep.run_config({})
    uri = absolute_uri(base.tracking.uri)
    store = Store.sweeps(base.resources.storage_path)
    if resume:
        sweep_dir = store.reopen(_find_sweep(store, sweep, resume))
        state = sweep_dir.read_json(SWEEP_FILE)
        record = SweepRecord.reopen(uri, state["parent_run_id"], state["name"])
    else:
        sweep_dir = store.create(timestamped(sweep.name), unique=True)
        record = SweepRecord.start(uri, base.tracking.experiment, sweep_dir.name, _parent_params(sweep))
        sweep_dir.write_json(SWEEP_FILE, {"name": sweep_dir.name, "parent_run_id": record.parent.run_id,
                                          "tracking_uri": uri, "file": sweep.path})
    directory = sweep_dir.local
    sweep.name = sweep_dir.name
    # Tune's experiment (trial checkpoints included) lives on the sweep's storage; a trial's
    # run directory may be local to its node, since Tune hands a restarted trial its checkpoint.
    tune_storage = sweep_dir.ray_storage(inside="tune")
    filesystem = tune_storage.get("storage_filesystem")
    tune_path = f"{tune_storage['storage_path']}/tune"
    context = TrialContext(sweep, uri, record.parent.run_id, str(directory / "runs"))
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    resources=lambda params: trial_resources(sweep, params))
    watcher = TrialWatcher(record, sweep.scheduler)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic live table, with our columns
    # Keeping 2 checkpoints per trial snapshots the experiment often; that is wanted here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        if resume:
            _name_the_classes_older_sweeps_pickled()
        if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
            tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False,
                                       storage_filesystem=filesystem)
        else:
            tuner = tune.Tuner(trainable, param_space=sweep.param_space(),
                               tune_config=_tune_config(sweep, base),
                               run_config=_run_config(sweep, tune_storage, watcher))
        tuner.fit()
    except KeyboardInterrupt:
        record.parent.finish("KILLED", "interrupted; finish it with raydeep tune --resume")
        raise
    result = summarise(sweep, record, directory)
    result.interrupted = TrialWatcher.interrupted.get(record.parent.run_id, False)
    _record_result(sweep, record, result)
    if result.best_config is not None:
        sweep_dir.upload(result.best_config.name)
    return result


def _name_the_classes_older_sweeps_pickled() -> None:
    """Tune pickles the sweep's callbacks with its experiment. A sweep started before the
    strategies and sweeps became packages (raydeep 0.1 up to 6c7c64b) names them by their
    old modules, `pipelines.sweep.TrialWatcher` among them; name them there too, so that
    such a sweep still resumes."""
    import sys

    import pipelines.sweep
    from pipelines.sweep import config, record, trial

    pipelines.sweep.TrialWatcher = TrialWatcher
    for old, new in (("sweep_trial", trial), ("sweep_config", config), ("sweep_tracking", record)):
        sys.modules.setdefault(f"pipelines.{old}", new)


def check_resumable(sweep: SweepConfig, resume: str | None) -> None:
    """Raise `ConfigError` when `--resume` names no sweep of this file: said before Ray starts."""
    if resume:
        store = Store.sweeps(sweep.run_config({}).resources.storage_path)
        store.check()
        _find_sweep(store, sweep, resume)


def _find_sweep(store: Store, sweep: SweepConfig, resume: str) -> str:
    """The name of the sweep of this file that `--resume` names."""
    return store.find(resume, prefix=f"{sweep.name}-")


def trial_resources(sweep: SweepConfig, params: dict[str, Any]):
    """The trial's process plus the actors its strategy starts, as one placement group
    (Ray places a trial's actors in its group: they are reserved before the trial starts)."""
    from ray.tune import PlacementGroupFactory

    head = {"CPU": sweep.trial_cpus, **({"GPU": sweep.trial_gpus} if sweep.trial_gpus else {})}
    try:
        run = sweep.run_config(params)
    except ConfigError:  # the trial fails with the reason in its child run; it needs no actors
        return PlacementGroupFactory([head])
    strategy = registry.get(run.strategy.name)
    actors = strategy.actor_bundles(run) if strategy.bundles_in_trial else []
    return PlacementGroupFactory([head, *actors])


def trial_demand(sweep: SweepConfig, run: RunConfig) -> dict[str, float]:
    """What one trial of `run` takes of the cluster: its own process and every actor it starts
    (Ray Train's workers too, which are not in the trial's placement group)."""
    head = {"CPU": sweep.trial_cpus, "GPU": sweep.trial_gpus}
    return total([head, *registry.get(run.strategy.name).actor_bundles(run)])


def trial_shortfall(sweep: SweepConfig, cluster: dict[str, float]) -> str | None:
    """Why no trial of the sweep could ever start on `cluster`, in one line (Tune would keep
    it PENDING for ever); None when the widest trial fits."""
    for run in _probe_runs(sweep):
        actors = len(registry.get(run.strategy.name).actor_bundles(run))
        for key, value in sorted(trial_demand(sweep, run).items()):
            if value > cluster.get(key, 0.0) + 1e-9:
                return (f"a trial of strategy {run.strategy.name} needs {value:g} {key} (the trial's "
                        f"own and its {actors} actors'), and the Ray cluster has "
                        f"{cluster.get(key, 0.0):g}: lower trial.cpus (e.g. trial: {{cpus: 0.5}}), "
                        "resources.workers or resources.cpus_per_worker, or add nodes")
    return None


def default_max_concurrent(sweep: SweepConfig, cluster: dict[str, float]) -> int:
    """As many trials as the cluster holds at once, counting every actor of the widest trial."""
    need: dict[str, float] = {}
    for run in _probe_runs(sweep):
        for key, value in trial_demand(sweep, run).items():
            need[key] = max(need.get(key, 0.0), value)
    fits = [math.floor(cluster.get(key, 0.0) / value + 1e-9) for key, value in need.items() if value > 0]
    return max(1, min(fits, default=1))


class TrialWatcher(tune.Callback):
    """Gives a child run the status its trial's process could not give it."""

    interrupted: dict[str, bool] = {}
    """Parent run id -> whether its experiment ended with trials left. Class-level: a resumed
    sweep runs the watcher Tune unpickles from its saved state, not the one made here."""

    def __init__(self, record: SweepRecord, scheduler: str):
        self.record, self.scheduler = record, scheduler

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A trial that ran to its end finished its child run itself; one still RUNNING was
        # stopped by the scheduler.
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        self.record.end_child(trial.trial_id, "KILLED",
                              f"stopped by the {self.scheduler} scheduler after {epochs} epochs")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.record.end_child(trial.trial_id, "FAILED", f"trial process failed: {trial.error_file or ''}")

    def on_experiment_end(self, trials, **info):
        TrialWatcher.interrupted[self.record.parent.run_id] = any(
            t.status not in ("TERMINATED", "ERROR") for t in trials)


def summarise(sweep: SweepConfig, record: SweepRecord, directory: Path) -> SweepResult:
    """The sweep as MLflow holds it: one outcome per child run, the best one, its config."""
    trials = []
    for run in record.children():
        metric = run.data.metrics.get(sweep.metric)
        trials.append(TrialOutcome(
            trial_id=run.data.tags.get("raydeep.trial_id", ""), name=run.info.run_name,
            status=run.info.status, params=json.loads(run.data.tags.get(PARAMS_TAG, "{}")),
            metric=metric if metric is not None and math.isfinite(metric) else None,
            epochs=len(Tracker(record.parent.uri, run.info.run_id,
                               run.info.experiment_id).metric_history(sweep.metric)),
            run_id=run.info.run_id, error=run.data.tags.get("error")))
    sign = 1 if sweep.mode == "max" else -1
    ranked = sorted((t for t in trials if t.metric is not None), key=lambda t: -sign * t.metric)
    finished = [t for t in ranked if t.status == "FINISHED"]
    best = (finished or ranked or [None])[0]
    result = SweepResult(sweep.name, directory, record.parent.run_id, sweep.metric, sweep.mode,
                         sorted(trials, key=lambda t: t.name), best)
    params = best.params if best is not None else {}
    if best is not None:
        result.best_said = f"{sweep.metric} {best.metric:.4f}"
    if sweep.seeds:
        result.configurations = ranked_configurations(sweep, trials)
        if result.configurations:  # the base's seed: the seeds judged the values, not one draw
            top = result.configurations[0]
            result.best, params, result.best_said = top.trials[0], top.values, described(sweep, top)
    if result.best is not None:
        result.best_config = directory / "best_config.yaml"
        result.best_config.write_text(best_config_yaml(sweep, params, result.best.name, result.best_said))
    return result


def best_config_yaml(sweep: SweepConfig, params: dict[str, Any], trial: str, said: str) -> str:
    """The best configuration's full run config, ready for `raydeep run FILE`."""
    run: RunConfig = sweep.run_config(params)
    run.tracking.run_name = None
    run.resume = None
    header = (f"# best {'configuration' if sweep.seeds else 'trial'} of sweep {sweep.name} ({sweep.path}): "
              f"{trial}, {said}\n# raydeep run THIS_FILE trains it again\n"
              "# (URI passwords are hidden: give them again with --storage-path / --tracking-uri)\n")
    # logged as an MLflow artifact and uploaded beside the sweep: no secret in clear
    return header + redact(yaml.safe_dump(run.to_dict(), sort_keys=False))


def _record_result(sweep: SweepConfig, record: SweepRecord, result: SweepResult) -> None:
    parent = record.parent
    counts = {f"trials_{s.lower()}": float(result.count(s)) for s in ("FINISHED", "FAILED", "KILLED")}
    best = result.configurations[0].mean if result.configurations else getattr(result.best, "metric", None)
    parent.log_metrics({"trials": float(len(result.trials)), **counts,
                        **({f"best_{sweep.metric}": best} if result.best else {})})
    if result.best is not None:
        parent.set_tags({"best_trial": result.best.name, "best_run_id": result.best.run_id,
                         "best": result.best_said})
        scored = [t for t in result.trials if t.metric is not None]
        fig = figures.sweep_scatter([sweep.decoded(t.params) for t in scored], [t.metric for t in scored],
                                    sweep.metric, [a.key for a in sweep.space if a.kind == "loguniform"])
        parent.log_figure(fig, "hyperparameters_vs_metric.png")
        figures.close(fig)
        parent.log_artifact(result.best_config)
    if result.interrupted:
        parent.finish("KILLED", "interrupted; finish it with raydeep tune --resume")
    else:
        parent.finish("FINISHED")


def _parent_params(sweep: SweepConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"file": sweep.path, "metric": sweep.metric, "mode": sweep.mode,
                              "samples": sweep.samples, "search": sweep.search,
                              "scheduler": sweep.scheduler}
    params.update({f"search.{k}": v for k, v in sweep.search_options.items()})
    params.update({f"scheduler.{k}": v for k, v in sweep.scheduler_options.items()})
    params.update({f"space.{a.key}": f"{a.kind} {a.values}" for a in sweep.space})
    params.update({f"base.{k}": v for k, v in sweep.run_config({}).flat().items()})
    return params


def _tune_config(sweep: SweepConfig, base: RunConfig):
    import ray

    concurrent = sweep.max_concurrent or default_max_concurrent(sweep, ray.cluster_resources())
    return tune.TuneConfig(
        metric=sweep.metric, mode=sweep.mode, num_samples=sweep.samples,
        search_alg=_search(sweep, concurrent), scheduler=_scheduler(sweep, base), reuse_actors=True,
        max_concurrent_trials=concurrent if sweep.search != "random" else None)


def _run_config(sweep: SweepConfig, storage: dict, watcher: TrialWatcher):
    return tune.RunConfig(
        **storage, callbacks=[watcher],  # storage: the sweep directory's tune/ (name)
        # PBT clones any trial's recent checkpoints: keep them all; otherwise the newest two.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if sweep.scheduler == "pbt" else 2),
        progress_reporter=tune.CLIReporter(
            metric_columns=[sweep.metric, "train_loss", "training_iteration"],
            parameter_columns=[a.key.replace(".", "/") for a in sweep.space], max_report_frequency=15,
            sort_by_metric=True, max_progress_rows=20),
        verbose=1)


def _search(sweep: SweepConfig, concurrent: int):
    seed = sweep.search_options.get("seed")
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores max_concurrent_trials for a variant generator: it takes its own limit.
    # With seeds, the random values are drawn before the grids are crossed, so that each
    # configuration's seeds (a grid) share them.
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent,
                                 constant_grid_search=bool(sweep.seeds))


def _scheduler(sweep: SweepConfig, base: RunConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    o = sweep.scheduler_options
    if sweep.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=o["max_t"] or base.optim.epochs,
                             grace_period=o["grace_period"], reduction_factor=o["reduction_factor"])
    if sweep.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=o["perturbation_interval"],
            quantile_fraction=o["quantile_fraction"], hyperparam_mutations=sweep.mutations(),
            synch=o["synch"])
    return FIFOScheduler()


def _probe_runs(sweep: SweepConfig) -> list[RunConfig]:
    runs = [sweep.run_config({})]
    for axis in sweep.space:
        for value in axis.probes():
            try:
                runs.append(sweep.run_config({axis.key: axis.param(value)}))
            except ConfigError:
                continue
    return runs

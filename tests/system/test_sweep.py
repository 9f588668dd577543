"""Ray Tune sweeps recorded in MLflow: one parent run per sweep, one child per trial."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, kill_process_tree, run_cli
from mlflow.tracking import MlflowClient

import pipelines
from pipelines.sweep.config import Axis, load
from pipelines.sweep.runner import run_sweep

pytestmark = pytest.mark.slow


def sweep_file(workdir: Path, store: str, space: str, *, epochs: int = 2, extra: str = "",
               base: str = "model: {name: mlp, depth: 1, width: 64}\n  strategy: {name: local}") -> Path:
    path = workdir / "sweep.yaml"
    path.write_text(f"""
base:
  {base}
  optim: {{name: adam, lr: 0.003, epochs: {epochs}}}
  tracking: {{uri: "{store}", log_model: false, figures: false}}
space:
{space}
metric: val_accuracy
mode: max
samples: 1
{extra}
""")
    return path


def children(store: str, parent_run_id: str) -> list:
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("raydeep")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def sweeps(store: str) -> list:
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("raydeep")
    return client.search_runs([experiment.experiment_id], filter_string="tags.`raydeep.kind` = 'sweep'")


def test_asha_sweep_records_a_parent_and_a_child_per_trial_and_stops_the_laggards(
        ray_session, workdir, store):
    # One trial at a time, the good learning rate first: ASHA's first rung then holds a
    # good accuracy that the hopeless rates (1e-5) cannot reach, so it must stop them.
    path = sweep_file(workdir, store, "  optim.lr: {grid: [0.003, 1.0e-5, 1.0e-5]}",
                      extra="scheduler: {name: asha, grace_period: 1, reduction_factor: 2}\n"
                            "max_concurrent: 1")
    result = run_sweep(load(path))
    runs = children(store, result.parent_run_id)
    assert len(runs) == 3 and len({r.data.tags["raydeep.trial_id"] for r in runs}) == 3
    client = MlflowClient(store)
    for run in runs:
        assert float(run.data.params["optim.lr"]) in (0.003, 1e-5)
        assert "val_accuracy" in run.data.metrics and "train_loss" in run.data.metrics
    statuses = {r.data.params["optim.lr"]: r.info.status for r in runs}
    assert statuses["0.003"] == "FINISHED"
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed, "ASHA stopped no trial"
    for run in killed:
        assert "stopped by the asha scheduler after 1 epochs" in run.data.tags["error"]
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == 3 and parent.data.metrics["trials_killed"] == len(killed)
    assert parent.data.params["space.optim.lr"].startswith("grid")
    assert parent.data.tags["best_run_id"] == result.best.run_id
    assert result.best.params == {"optim.lr": 0.003}
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"hyperparameters_vs_metric.png", "best_config.yaml"} <= artifacts

    # The exported config is a run config: `raydeep run` trains the best trial again.
    done = run_cli("run", str(result.best_config), "--run-name", "again", cwd=workdir)
    assert done.returncode == 0, done.stderr
    again = client.search_runs([parent.info.experiment_id], filter_string="attributes.run_name = 'again'")[0]
    assert again.data.metrics["val_accuracy"] == pytest.approx(result.best.metric, abs=0.02)


def test_a_killed_sweep_resumes_with_one_child_per_trial_and_reports_a_diverged_one(
        ray_session, workdir, store):
    # The last trial's rate makes the loss nan: its child is FAILED with the reason, the
    # other trials finish, and the resumed sweep still exits 0 and reports the failure.
    # 8 epochs: the second trial lasts seconds, long enough to be caught running
    path = sweep_file(workdir, store, "  optim.lr: {grid: [0.002, 0.004, 1.0e+12]}", epochs=8,
                      extra="scheduler: fifo\nmax_concurrent: 1")
    path.write_text(path.read_text().replace("name: adam", "name: sgd"))
    command = [sys.executable, "-m", "cluster.cli", "tune", str(path), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    def started() -> int:
        """Trials with a child run so far (the store may be busy or not made yet: 0)."""
        try:
            parents = sweeps(store) if (workdir / "mlflow.db").exists() else []
            return len(children(store, parents[0].info.run_id)) if parents else 0
        except Exception:
            return 0

    try:  # kill it once the first trial is done and the second has started: its child run
        # exists (its run directory comes later, at its first checkpoint, when a quick second
        # trial may be over and the third, diverging one started)
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and started() < 2:
            time.sleep(0.2)
        assert first.poll() is None, "the sweep ended before it could be killed"
    finally:
        # The driver, its local Ray and the trial processes, all gone before the resume (a
        # trial left running a moment longer pruned the resumed trial's fresh checkpoint).
        kill_process_tree(first.pid)
        first.wait()
    (parent,) = sweeps(store)
    # Work was left: a trial not started yet, or one killed running (on a quiet machine the
    # second trial can end and the third start between two looks at the store).
    cut = children(store, parent.info.run_id)
    assert 1 <= len(cut) < 3 or any(r.info.status == "RUNNING" for r in cut), [r.info.status for r in cut]

    done = run_cli("tune", str(path), "--num-cpus", "2", "--resume", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(2 finished, 0 killed, 1 failed)" in done.stdout
    assert "failed: " in done.stdout and "training loss became nan" in done.stdout
    assert len(sweeps(store)) == 1  # the same parent run, continued
    runs = children(store, parent.info.run_id)
    assert len(runs) == 3 and len({r.data.tags["raydeep.trial_id"] for r in runs}) == 3
    status = {r.data.params["optim.lr"]: r.info.status for r in runs}
    assert status == {"0.002": "FINISHED", "0.004": "FINISHED", "1000000000000.0": "FAILED"}
    diverged = next(r for r in runs if r.info.status == "FAILED")
    assert "training loss became nan" in diverged.data.tags["error"]
    parent = MlflowClient(store).get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 1


def test_strategies_sweep_runs_every_strategy_as_a_trial(ray_session, workdir, store):
    # The file's grid names every mini-batch strategy (lbfgs takes whole-data steps: another
    # budget). Two of them run here, one worker each: allreduce (a Ray Train worker group
    # inside a Tune trial) and ps (raydeep's own actors started from a trial, as pipeline
    # and diloco start theirs); each is checked against local by its own tests, and every
    # further trial would cost a trial process and its actors (about 10 s here) for no path
    # of its own.
    from pipelines import registry

    sweep = load(REPO / "tune_configs" / "strategies.yaml",
                 {"tracking.uri": store, "optim.epochs": 2, "optim.steps_per_epoch": 4, "resources.workers": 1,
                  "tracking.figures": False})
    (axis,) = [a for a in sweep.space if a.key == "strategy"]
    assert {v["name"] for v in axis.values} == set(registry.names()) - {"lbfgs"}
    sweep.space = [Axis("strategy", "grid", [v for v in axis.values if v["name"] in ("allreduce", "ps")])]
    result = run_sweep(sweep)
    runs = children(store, result.parent_run_id)
    by_strategy = {r.data.params["strategy.name"]: r for r in runs}
    assert set(by_strategy) == {"allreduce", "ps"}
    for name, run in by_strategy.items():
        assert run.info.status == "FINISHED", (name, run.data.tags.get("error"))
        history = MlflowClient(store).get_metric_history(run.info.run_id, "val_accuracy")
        assert len({m.step for m in history}) == 2, name
    # Same data, seed and steps: allreduce's trial took local's steps.
    local = pipelines.train(sweep.run_config({"strategy": axis.param({"name": "local"})}))
    assert by_strategy["allreduce"].data.metrics["val_accuracy"] == pytest.approx(local.history[-1]["val_accuracy"],
                                                                                  abs=1e-6)


def test_pbt_sweep_restores_trials_from_checkpoints(ray_session, workdir, store):
    path = sweep_file(workdir, store, "  optim.lr: {grid: [1.0e-5, 0.003]}", epochs=3,
                      extra="scheduler: {name: pbt, perturbation_interval: 1, quantile_fraction: 0.5, synch: true}\n"
                            "max_concurrent: 2")
    result = run_sweep(load(path))
    runs = children(store, result.parent_run_id)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    # The hopeless trial was given the good trial's weights (and a rate from the space): its
    # child run goes on and ends far above where three epochs at 1e-5 leave an MLP (about 0.2).
    slow = next(r for r in runs if r.data.params["optim.lr"] == "1e-05")
    assert slow.data.metrics["val_accuracy"] > 0.5


SMOKE_FILES = sorted(p for p in (REPO / "tune_configs").glob("*.yaml")
                     if p.stem not in ("strategies", "pbt"))  # those two have tests of their own


def drawn_config(sweep, pick: int):
    """A config a trial of the sweep could draw: value `pick` (wrapped) of every choice or
    grid, the low or high end of every range."""
    params = {}
    for axis in sweep.space:
        if axis.kind in ("choice", "grid"):
            params[axis.key] = axis.param(axis.values[pick % len(axis.values)])
        else:
            params[axis.key] = axis.probes()[pick % 2]
    return sweep.run_config(params)


@pytest.mark.parametrize("path", SMOKE_FILES, ids=lambda p: p.stem)
def test_every_family_sweep_file_trains_what_its_trials_draw(workdir, store, path):
    """Each file's drawn configs train and report the file's metric; one Tune process per
    file would cost seconds each for what one sweep below already checks of Tune."""
    sweep = load(path, {"tracking.uri": store, "optim.epochs": 1, "optim.steps_per_epoch": 2})
    result = pipelines.train(drawn_config(sweep, pick=1))
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    assert sweep.metric in run.data.metrics, (path.stem, sweep.metric, sorted(run.data.metrics))


def test_a_family_sweep_file_runs_as_a_tune_sweep(ray_session, workdir, store):
    path = REPO / "tune_configs" / "vae.yaml"  # a metric to maximise that is not an accuracy
    sweep = load(path, {"tracking.uri": store, "optim.epochs": 1, "optim.steps_per_epoch": 2,
                        "tracking.figures": False}, samples=1, scheduler="fifo")
    # One trial: grids become choices.
    sweep.space = [Axis(a.key, "choice", a.values) if a.kind == "grid" else a for a in sweep.space]
    result = run_sweep(sweep)
    (run,) = children(store, result.parent_run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    assert sweep.metric in run.data.metrics
    assert result.best_config is not None and result.best_config.is_file()


def test_a_sweep_over_a_users_module_init_args_judges_each_configuration_by_its_seeds_mean(
        ray_session, workdir, store):
    """The trials import the module from the directory it was found in (recorded as
    model.code_dir): the session's Ray was started without it. With `seeds`, each width
    trains once per seed at the same drawn rate, and the best is the width whose mean over
    its seeds is best: the parent's figure, the printed line and best_config.yaml say it."""
    code = workdir / "project"
    code.mkdir()
    (code / "sweepnet.py").write_text(
        "import math\nfrom torch import nn\n\n"
        "def make(input_shape, num_classes, width: int = 8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),\n"
        "                         nn.Linear(width, num_classes))\n")
    path = sweep_file(workdir, store, "  model.init_args.width: {grid: [4, 12]}\n"
                                      "  optim.lr: {loguniform: [0.001, 0.01]}", epochs=1, extra="seeds: [0, 1]",
                      base=f"model: {{class_path: 'sweepnet:make', code_dir: '{code}'}}\n"
                           "  strategy: {name: local}")
    done = run_cli("tune", str(path), "--set", "optim.steps_per_epoch=3", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,) = sweeps(store)
    runs = children(store, parent.info.run_id)
    assert sorted((r.data.params["model.init_args.width"], r.data.params["seed"]) for r in runs) == [
        ("12", "0"), ("12", "1"), ("4", "0"), ("4", "1")]
    by_width: dict[str, list] = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("error")
        assert run.data.tags["raydeep.model_class_path"] == "sweepnet:make"
        assert run.data.metrics["num_params"] == {"4": 4 * 65 + 5 * 10, "12": 12 * 65 + 13 * 10}[
            run.data.params["model.init_args.width"]]
        by_width.setdefault(run.data.params["model.init_args.width"], []).append(run)
    for width, pair in by_width.items():  # a configuration's seeds share its drawn rate
        assert pair[0].data.params["optim.lr"] == pair[1].data.params["optim.lr"], width
    means = {w: sum(r.data.metrics["val_accuracy"] for r in pair) / 2 for w, pair in by_width.items()}
    written = done.stdout.split("its config: ")[1].split()[0]
    config = yaml.safe_load(Path(written).read_text())
    best = str(config["model"]["init_args"]["width"])  # two widths may tie after 3 steps: either is best
    assert means[best] == max(means.values()) and config["seed"] == 0  # the base's seed
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(means[best], rel=1e-12)
    assert "(mean of seeds 0, 1: " in parent.data.tags["best"]
    assert f"model.init_args.width={best} " in done.stdout and f"configuration {means[best]:.4f}" in done.stdout
    assert config["optim"]["lr"] == pytest.approx(float(by_width[best][0].data.params["optim.lr"]))
    sys.modules.pop("sweepnet", None)


def test_a_sweep_whose_trials_cannot_fit_the_cluster_is_refused_in_one_line(ray_session, workdir, store):
    """Tune would keep such a trial PENDING for ever (a ps sweep with the defaults on a
    2-core machine did): the widest trial is checked against the cluster before anything
    is recorded."""
    path = sweep_file(workdir, store, "  optim.lr: {grid: [0.1]}",
                      base="model: {name: mlp}\n  strategy: {name: ps}\n  resources: {workers: 4}")
    cpus = ray_session.cluster_resources()["CPU"]
    done = run_cli("tune", str(path), cwd=workdir)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines == [f"raydeep: error: a trial of strategy ps needs 5 CPU (the trial's own and its 4 actors'), "
                     f"and the Ray cluster has {cpus:g}: lower trial.cpus (e.g. trial: {{cpus: 0.5}}), "
                     "resources.workers or resources.cpus_per_worker, or add nodes"]
    assert not (workdir / "mlflow.db").exists() and not (workdir / "raydeep_runs").exists()

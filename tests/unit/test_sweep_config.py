"""Sweep files: every file in tune_configs/ is valid, bad ones fail in one line naming the file."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli

from pipelines.config import ConfigError
from pipelines.sweep.config import load
from pipelines.sweep.runner import default_max_concurrent, trial_resources

SWEEP_FILES = sorted((REPO / "tune_configs").glob("*.yaml"))


def test_there_is_a_sweep_file_per_family_and_one_over_strategies():
    names = {p.stem for p in SWEEP_FILES}
    assert {"mlp", "cnn", "rnn", "autoencoder", "rbm", "dbn", "vae", "structured", "strategies"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sweep_file_is_valid(path):
    sweep = load(path)
    assert sweep.space and sweep.metric and sweep.mode in ("min", "max")
    for axis in sweep.space:  # each value of each axis gives a run config that builds
        for value in axis.probes():
            run = sweep.run_config({axis.key: axis.param(value)})
            if isinstance(value, dict):  # a whole section
                assert all(run.flat()[f"{axis.key}.{k}"] == v for k, v in value.items())
            else:
                assert run.flat()[axis.key] == value


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


GOOD = """
base: {model: {name: mlp}, strategy: {name: local}, optim: {epochs: 2}}
space:
  optim.lr: {loguniform: [0.001, 0.1]}
metric: val_accuracy
mode: max
"""


@pytest.mark.parametrize("space, message", [
    ("optim.lrr: {uniform: [0.1, 0.2]}", "unknown config key 'optim.lrr'"),
    ("model.width: {choice: []}", "space.model.width: choice needs a non-empty list"),
    ("optim.lr: {uniform: [0.5, 0.1]}", "space.optim.lr: low (0.5) > high (0.1)"),
    ("optim.lr: {loguniform: [0, 0.1]}", "loguniform needs low > 0"),
    ("optim.lr: {normal: [0, 1]}", "unknown distribution 'normal'"),
    ("model.depth: {choice: [1, two]}", "space.model.depth = 'two'"),
    ("model.projection: {choice: [dense, hadamard]}", "unknown projection 'hadamard'"),
])
def test_a_bad_search_space_names_the_file_and_the_key(tmp_path, space, message):
    path = write(tmp_path, GOOD.replace("optim.lr: {loguniform: [0.001, 0.1]}", space))
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags, message", [
    ({"scheduler": "hyperband"}, "scheduler 'hyperband' is unknown (known: fifo, asha, pbt)"),
    ({"search": "bayes"}, "search 'bayes' is unknown"),
    ({"samples": 0}, "samples must be an integer >= 1, got 0"),
    ({"max_concurrent": 0}, "max_concurrent must be an integer >= 1"),
])
def test_bad_sweep_flags_name_the_file(tmp_path, flags, message):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as error:
        load(path, **flags)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_metric_must_be_one_the_model_reports(tmp_path):
    with pytest.raises(ConfigError, match="metric 'val_elbo' is not reported per epoch here "
                                          r"\(reported: train_loss, val_loss, val_accuracy\)"):
        load(write(tmp_path, GOOD.replace("val_accuracy", "val_elbo")))


def test_scheduler_settings_are_checked(tmp_path):
    text = GOOD + "scheduler: {name: asha, grace: 2}\n"
    with pytest.raises(ConfigError, match="scheduler.grace is not a setting of asha"):
        load(write(tmp_path, text))


@pytest.mark.parametrize("setting, message", [
    ("scheduler: {name: asha, grace_period: 0}", "scheduler.grace_period must be an integer >= 1, got 0"),
    ("scheduler: {name: asha, grace_period: two}", "scheduler.grace_period must be an integer >= 1, got 'two'"),
    ("scheduler: {name: asha, reduction_factor: 1}", "scheduler.reduction_factor must be a number > 1"),
    ("scheduler: {name: asha, grace_period: 5, max_t: 2}", "scheduler.grace_period (5) exceeds scheduler.max_t (2)"),
    ("scheduler: {name: pbt, quantile_fraction: 0.9}", "scheduler.quantile_fraction must be in (0, 0.5]"),
    ("scheduler: {name: pbt, perturbation_interval: 0}", "scheduler.perturbation_interval must be an integer >= 1"),
    ("scheduler: {name: pbt, synch: maybe}", "scheduler.synch must be true or false"),
    ("search: {name: optuna, seed: abc}", "search.seed must be an integer >= 0, got 'abc'"),
    ("search: {name: random, seed: -1}", "search.seed must be an integer >= 0, got -1"),
    ("seeds: 3", "seeds must list two or more different integers >= 0, got 3"),
    ("seeds: [0, 0]", "seeds must list two or more different integers >= 0, got [0, 0]"),
    ("seeds: [0, true]", "seeds must list two or more different integers >= 0, got [0, True]"),
    ("seeds: [0, -1]", "seeds must list two or more different integers >= 0, got [0, -1]"),
    ("seeds: [0, 1]\nsearch: optuna", "seeds need search random"),
    ("seeds: [0, 1]\nscheduler: pbt", "seeds need scheduler fifo: pbt stops or copies trials"),
])
def test_scheduler_search_and_seeds_values_are_checked_before_ray(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(write(tmp_path, GOOD + setting + "\n"))


def test_optuna_refuses_grid_axes(tmp_path):
    text = GOOD.replace("{loguniform: [0.001, 0.1]}", "{grid: [0.01, 0.1]}") + "search: optuna\n"
    with pytest.raises(ConfigError, match="grid axes need search random"):
        load(write(tmp_path, text))


def test_cli_overrides_reach_the_base_config(tmp_path):
    sweep = load(write(tmp_path, GOOD), {"optim.epochs": "5", "resources.workers": "3"}, ["optim.name=adam"])
    run = sweep.run_config({"optim.lr": 0.02})
    assert (run.optim.epochs, run.resources.workers, run.optim.name, run.optim.lr) == (5, 3, "adam", 0.02)


def test_sections_and_lists_travel_as_yaml_text():
    sweep = load(REPO / "tune_configs" / "strategies.yaml")
    (axis,) = sweep.space
    grid = axis.domain()["grid_search"]
    assert all(isinstance(v, str) for v in grid)  # Optuna and Tune's table take scalars
    run = sweep.run_config({"strategy": grid[2]})
    assert run.strategy.name == "ps" and run.strategy.options.shards == 2
    assert yaml.safe_load(grid[3]) == {"name": "pipeline", "stages": 2, "microbatches": 4}


def test_trial_resources_reserve_the_strategy_actors():
    sweep = load(REPO / "tune_configs" / "strategies.yaml")
    bundles = {yaml.safe_load(v)["name"]: trial_resources(sweep, {"strategy": v}).bundles
               for v in sweep.space[0].domain()["grid_search"]}
    assert bundles["local"] == [{"CPU": 1.0}]
    assert bundles["ps"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # driver + 2 workers
    assert bundles["pipeline"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # driver + 2 stages
    assert bundles["allreduce"] == [{"CPU": 1.0}]  # Ray Train reserves its own worker group
    # The widest trial takes 3 CPUs, allreduce's workers counted: 8 CPUs hold 2 at once.
    assert default_max_concurrent(sweep, {"CPU": 8.0}) == 2
    assert default_max_concurrent(sweep, {"CPU": 2.0}) == 1


def test_pbt_mutates_the_optimizer_axes():
    sweep = load(REPO / "tune_configs" / "pbt.yaml")
    assert set(sweep.mutations()["optim"]) == {"lr", "momentum"}  # nested, as Tune takes them


def test_cli_bad_sweep_file_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, GOOD.replace("{loguniform: [0.001, 0.1]}", "{uniform: [0.3, 0.1]}"))
    done = run_cli("tune", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"raydeep: error: {path}: space.optim.lr: low (0.3) > high (0.1)"
    path = write(tmp_path, GOOD)
    done = run_cli("tune", str(path), "--scheduler", "median", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert f"{path}: scheduler 'median' is unknown" in done.stderr
    done = run_cli("tune", str(path), "--resume", "never-ran", "--num-cpus", "1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"raydeep: error: --resume 'never-ran': no sweep of that name under {tmp_path / 'raydeep_runs' / 'sweeps'}")


def test_optuna_draws_configs_the_sweep_accepts():
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.sweep.runner import _search

    sweep = load(REPO / "tune_configs" / "cnn.yaml", search="optuna")
    searcher = _search(sweep, concurrent=1)
    assert isinstance(searcher, OptunaSearch)
    assert searcher.set_search_properties(sweep.metric, sweep.mode, sweep.param_space())
    for i in range(3):  # lists (channels) come back as YAML text and decode into the config
        run = sweep.run_config(searcher.suggest(f"trial-{i}"))
        assert run.model.params.channels in ([16, 32], [32, 64])
        assert 0.005 <= run.optim.lr <= 0.2


SWEPT_SEED = GOOD.replace("metric:", "  seed: {grid: [0, 1]}\nmetric:")


def test_seeds_are_the_spaces_last_grid_and_a_configuration_is_what_its_seeds_share(tmp_path):
    with pytest.raises(ConfigError, match="seed is swept by seeds: drop space.seed"):
        load(write(tmp_path, SWEPT_SEED + "seeds: [0, 1]\n"))
    sweep = load(write(tmp_path, GOOD + "seeds: [4, 2, 9]\n"))
    assert [(a.key, a.kind, a.values) for a in sweep.space][-1] == ("seed", "grid", [4, 2, 9])
    params = {"optim": {"lr": 0.02}, "seed": 2}
    assert sweep.configuration(params) == {"optim.lr": 0.02}
    assert sweep.run_config(params).seed == 2 and sweep.run_config(sweep.configuration(params)).seed == 0
    plain = load(write(tmp_path, SWEPT_SEED))  # a swept seed without seeds is a setting
    assert plain.configuration(params) == {"optim.lr": 0.02, "seed": 2}

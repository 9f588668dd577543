"""Default recipes (`pipelines.recipes`): what `config.load` lays under the keys a user gives,
and that every shipped recipe names the sweep that chose it and builds a valid run under
every strategy."""
import copy
from pathlib import Path

import pytest
import yaml

import models
from pipelines import config, recipes, registry
from pipelines.config import ConfigError, from_dict
from pipelines.sweep import config as sweeps
from pipelines.sweep.config import SEED_KEY

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in recipes.RECIPES.glob("*.yaml"))


def test_the_recipe_lies_under_what_the_user_gives():
    plain = config.load(overrides={"model.name": "mlp", "strategy.name": "local"})
    recipe = recipes.settings("mlp", "local")
    assert plain.recipe == "mlp/local"
    assert plain.optim.name == recipe["optim"]["name"] and plain.optim.lr == recipe["optim"]["lr"]
    assert plain.model.params.dropout == recipe["model"]["dropout"]
    assert plain.flat()["recipe"] == "mlp/local"  # logged as an MLflow param with the rest
    assert config.load().recipe == "mlp/allreduce"  # the main job: the schema's family and strategy
    mine = config.load(overrides={"model.name": "mlp", "strategy.name": "local", "optim.lr": 0.5,
                                  "optim.epochs": 3}, sets=["model.dropout=0.0"])
    assert (mine.optim.lr, mine.optim.epochs, mine.model.params.dropout) == (0.5, 3, 0.0)
    assert mine.optim.name == recipe["optim"]["name"] and mine.optim.schedule == recipe["optim"]["schedule"]


def test_naming_another_optimizer_drops_the_recipes_rate_and_decay_with_it(monkeypatch):
    recipe = recipes.settings("mlp", "local")["optim"]
    assert recipe["name"] != "sgd"
    other = config.load(overrides={"model.name": "mlp", "strategy.name": "local", "optim.name": "sgd"})
    schema = from_dict({}).optim
    assert (other.optim.lr, other.optim.weight_decay, other.optim.momentum) == (
        schema.lr, schema.weight_decay, schema.momentum)
    assert other.optim.epochs == recipe["epochs"]  # the rest of the recipe stays
    # likewise a strategy's change of optimizer (no shipped recipe makes one now: ps's
    # sweep moved it from Adagrad to the family's AdamW), here in a recipe of its own
    written = {"recipe": {"optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01, "epochs": 50}},
               "strategies": {"ps": {"optim": {"name": "adagrad", "lr": 0.02}}}}
    monkeypatch.setattr(recipes, "read", lambda family: copy.deepcopy(written))
    ps = recipes.settings("mlp", "ps")["optim"]
    assert ps == {"name": "adagrad", "lr": 0.02, "epochs": 50}  # no decay tuned for AdamW
    assert recipes.settings("mlp", "local")["optim"] == written["recipe"]["optim"]


def test_a_run_shorter_than_the_recipes_warmup_starts_at_full_rate():
    warmup = recipes.settings("mlp", "local")["optim"]["warmup_epochs"]
    assert warmup >= 1
    short = config.load(overrides={"model.name": "mlp", "strategy.name": "local", "optim.epochs": 1})
    assert short.optim.warmup_epochs == 0 and short.optim.schedule == "cosine"
    asked = config.load(overrides={"model.name": "mlp", "optim.epochs": 4, "optim.warmup_epochs": 2})
    assert asked.optim.warmup_epochs == 2
    with pytest.raises(ConfigError, match="optim.warmup_epochs must be in"):  # the user's own, refused
        config.load(overrides={"model.name": "mlp", "optim.epochs": 1, "optim.warmup_epochs": 1})


def test_no_recipe_for_the_schema_defaults_a_users_module_or_from_dict(tmp_path):
    off = config.load(overrides={"model.name": "mlp", "recipe": False})
    assert off.recipe is None and off.optim == from_dict({"model": {"name": "mlp"}}).optim
    assert config.load(sets=["model.name=mlp", "recipe=false"]).recipe is None  # --set, as text
    # a config written out (a sweep's best_config.yaml) records its recipe: laid again, the same run
    again = config.load(overrides={"model.name": "mlp", "strategy.name": "local", "recipe": "mlp/local"})
    assert again.recipe == "mlp/local" and again.optim == config.load(
        overrides={"model.name": "mlp", "strategy.name": "local"}).optim
    with pytest.raises(ConfigError, match="recipe must be true or false .* got 'flase'"):
        config.load(sets=["recipe=flase"])
    assert from_dict({"model": {"name": "mlp"}}).recipe is None
    (tmp_path / "my_nets.py").write_text("from torch import nn\nclass Net(nn.Sequential):\n"
                                         "    def __init__(self):\n        super().__init__(nn.Flatten(), nn.Linear(64, 10))\n")
    users = config.load(overrides={"model.class_path": "my_nets:Net", "model.code_dir": str(tmp_path)})
    assert users.recipe is None and users.optim == from_dict({}).optim
    assert config.load(overrides={"model.name": "vae"}).recipe is None  # a family without a file


def test_a_strategys_changes_go_over_the_familys_recipe():
    for family in SHIPPED:
        raw = yaml.safe_load(recipes.path(family).read_text())
        for strategy, changes in (raw.get("strategies") or {}).items():
            merged = recipes.settings(family, strategy)
            for section, keys in changes.items():
                for key, value in keys.items():
                    assert merged[section][key] == value, (family, strategy, section, key)


@pytest.mark.parametrize("family", SHIPPED)
def test_every_shipped_recipe_names_its_sweep_and_builds_under_every_strategy(family):
    assert family in models.names()
    raw = yaml.safe_load(recipes.path(family).read_text())
    chosen = raw["chosen_by"]
    assert len(chosen["parent_run"]) == 32 and chosen["best"]
    sweep = sweeps.load(REPO / chosen["sweep"])  # the sweep that chose it still loads as a sweep
    swept = {axis.key for axis in sweep.space} - ({SEED_KEY} if sweep.seeds else set())  # seeds judge, not set
    laid = config.flat_keys(raw["recipe"])
    assert swept <= set(laid), swept - set(laid)  # every axis the sweep chose is in the recipe
    base = config.flat_keys(sweep.base)
    for key, value in laid.items():  # what the recipe fixes is the sweep's base or its axes
        assert key in swept or base.get(key) == value, (family, key, value, base.get(key))
    for strategy in registry.names():
        try:
            built = config.load(overrides={"model.name": family, "strategy.name": strategy})
        except ConfigError as e:  # a strategy may refuse a family (pipeline cuts, lbfgs's), never the recipe
            assert "recipe" not in str(e) and "optim." not in str(e), (family, strategy, e)
            continue
        assert built.recipe == f"{family}/{strategy}"


def test_a_recipe_file_may_only_set_how_a_family_trains(tmp_path, monkeypatch):
    (tmp_path / "mlp.yaml").write_text("recipe: {tracking: {uri: 'sqlite:///x.db'}}\n")
    monkeypatch.setattr(recipes, "RECIPES", tmp_path)
    with pytest.raises(ConfigError, match="a recipe sets model, data, optim, strategy only, not tracking"):
        config.load(overrides={"model.name": "mlp"})


def test_describe_says_what_the_run_took_from_its_recipe():
    line = recipes.describe(config.load(overrides={"model.name": "mlp", "strategy.name": "local",
                                                   "optim.epochs": 3}))
    assert line.startswith("recipe mlp/local (tune_configs/recipes/mlp.yaml): ")
    assert "optim.name=adamw" in line and "optim.epochs" not in line and "--no-recipe" in line

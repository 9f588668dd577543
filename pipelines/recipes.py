"""Default recipes: each built-in family's training defaults, chosen by recorded sweeps.

The schema's defaults (`pipelines.config`) are one set for every family: sgd at 0.05 for 10
epochs trains an MLP to 0.972 on digits and a DBN to 0.70. A recipe is what a family trains
best with on its own, found by a sweep over its own settings, and what each strategy changes
in it (an asynchronous `ps` wants Adagrad, `lbfgs` no schedule). `tune_configs/recipes/<family>.yaml`:

    chosen_by: {sweep: tune_configs/recipes/sweeps/mlp.yaml, parent_run: 130f..., best: ...}
    recipe:                     # under every strategy: keys of the run config
      optim: {name: adamw, lr: 0.0237, weight_decay: 0.01, epochs: 30, schedule: cosine}
      model: {dropout: 0.3}
    strategies:                 # a strategy's changes, over the family's recipe
      ps: {optim: {name: adagrad, lr: 0.0163}, model: {dropout: 0.0}}

`config.load` (the CLI's `raydeep run` and the Python API) lays the recipe under what the user
gives: a key set in the YAML file, by a flag or by `--set` wins. An optimizer's settings come
as a group: naming another optimizer than the recipe's drops its rate, momentum and weight
decay too (a rate tuned for AdamW is no rate for SGD), and a run of no more epochs than
the recipe's warm-up starts at its full rate. A user's own module has no recipe,
nor has a family without a file, and `recipe: false` in the config (`--no-recipe`) asks for
the schema's defaults. The run records the recipe it took (`RunConfig.recipe`, the MLflow param
`recipe`). `pipelines.config.from_dict` builds exactly the dict it is given.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError
from pipelines.values import flat_keys, merged
from pipelines.yaml_files import load_yaml

RECIPES = Path(__file__).resolve().parents[1] / "tune_configs" / "recipes"
"""Where the recipe files are: beside the packages, in a checkout and in an installed wheel."""
OPTIMIZER_GROUP = ("lr", "momentum", "weight_decay")
"""The settings tuned with an optimizer: they go with the recipe's `optim.name`."""
SECTIONS = ("model", "data", "optim", "strategy")
"""What a recipe may set: how a family is trained, never where it runs or how it is recorded."""


def path(family: str) -> Path:
    return RECIPES / f"{family}.yaml"


def read(family: str) -> dict[str, Any] | None:
    """A family's recipe file, checked; None for a family without one."""
    where = path(family)
    if not where.is_file():
        return None
    raw = load_yaml(str(where)) or {}
    outside = [k for k in raw.get("recipe") or {} if k not in SECTIONS]
    outside += [f"strategies.{s}.{k}" for s, keys in (raw.get("strategies") or {}).items()
                for k in keys or {} if k not in SECTIONS]
    if outside:  # a defect of the shipped file, not of the user's input
        raise ConfigError(f"{where}: a recipe sets {', '.join(SECTIONS)} only, not {', '.join(outside)}")
    return raw


def settings(family: str, strategy: str) -> dict[str, Any] | None:
    """The run-config keys the recipe gives `family` under `strategy` (nested), or None."""
    raw = read(family)
    if raw is None:
        return None
    family_settings = copy.deepcopy(raw.get("recipe") or {})
    changes = (raw.get("strategies") or {}).get(strategy) or {}
    _drop_group(family_settings.get("optim") or {}, changes.get("optim") or {})
    return merged(family_settings, copy.deepcopy(changes))


def _drop_group(optim: dict[str, Any], over: dict[str, Any]) -> None:
    """A recipe's rate, momentum and decay go with its optimizer: another one named over it
    (a strategy's change, the user's choice) takes none of them."""
    if "name" in over and str(over["name"]).strip() != str(optim.get("name")):
        for key in OPTIMIZER_GROUP:
            optim.pop(key, None)


def lay_under(given: dict[str, Any], family: str, strategy: str) -> tuple[dict[str, Any], str | None]:
    """`given` (a nested run config, as the user wrote it) with its family's recipe under it,
    and the recipe's name (`mlp/ps`), or `given` itself and None when no recipe applies.
    `family` and `strategy` are the schema's defaults, for a `given` that names neither."""
    given = dict(given)
    if not _wanted(given.pop("recipe", None)):
        return given, None
    model, section = given.get("model") or {}, given.get("strategy") or {}
    if not isinstance(model, dict) or not isinstance(section, dict):
        return given, None  # from_dict names the bad section
    family = str(model.get("name", family)).strip()
    strategy_name = str(section.get("name", strategy)).strip()
    if "class_path" in model:
        return given, None
    recipe = settings(family, strategy_name)
    if recipe is None:
        return given, None
    optim, ours = given.get("optim") or {}, recipe.get("optim") or {}
    if isinstance(optim, dict):
        _drop_group(ours, optim)
    laid = merged(recipe, given)  # the user's keys over the recipe's
    if isinstance(optim, dict) and "warmup_epochs" in ours and "warmup_epochs" not in optim:
        try:  # a run shorter than the recipe's warm-up starts at its full rate
            if float(str(laid["optim"].get("epochs", ours.get("epochs", 0)))) <= float(ours["warmup_epochs"]):
                laid["optim"]["warmup_epochs"] = 0.0
        except ValueError:
            pass  # from_dict names the bad epochs
    return laid, f"{family}/{strategy_name}"


def _wanted(value: Any) -> bool:
    """`recipe`: true or unset (lay it), false (the schema's defaults), or the family/strategy
    a written-out config records (laid again: its keys are all set, so it changes nothing)."""
    text = str(value).strip().lower()
    if value is None or value is True or text in ("true", "yes", "on") or (isinstance(value, str) and "/" in text):
        return True
    if value is False or text in ("false", "no", "off"):
        return False
    raise ConfigError(f"recipe must be true or false (false: the schema's defaults, as --no-recipe), got {value!r}")


def describe(config) -> str | None:
    """One line for the terminal: the recipe a config took and what of it the run uses."""
    if not config.recipe:
        return None
    family, strategy = config.recipe.split("/", 1)
    values = config.flat()
    taken = [f"{key}={value}" for key, value in flat_keys(settings(family, strategy) or {}).items()
             if values.get(key) == value]
    return (f"recipe {config.recipe} ({path(family).relative_to(RECIPES.parents[1])}): {' '.join(taken)}"
            "  [--no-recipe: the schema's defaults]")


"""What `--resume` continues: the saved run's own config, with what a command may change.

A resumed run trains what it trained before: its model, data, optimizer (but the number of
epochs), strategy and seed come from the run's marker, whatever the command line leaves
out (a plain `raydeep run --resume` continues a CNN run as a CNN). Where it runs and how it
is recorded (`resources`, `tracking`) come from the command, as for any run: the marker's
copy of a storage or tracking URI has its password hidden. A command that asks to change
what is trained is refused in one line; a new `optim.epochs` is taken and said.
"""
from __future__ import annotations

from typing import Any

from pipelines import config as configs
from pipelines import values
from pipelines.config import ConfigError, RunConfig
from pipelines.storage import RUN_FILE, Store

TRAINED = ("model.", "data.", "optim.", "strategy.", "seed")
"""Keys that say what is trained: they cannot change on resume (but `optim.epochs`)."""
MAY_CHANGE = ("optim.epochs",)


def load(path: str | None, overrides: dict[str, Any], sets: list[str]) -> tuple[RunConfig, list[str]]:
    """The config of the run `overrides["resume"]` names, with the command's keys over it;
    and what the command changed that the user should hear about."""
    given = configs.load_raw(path, overrides, sets)
    where = configs.from_dict({k: v for k, v in given.items() if k in ("resources", "tracking", "resume")})
    store = Store(where.resources.storage_path)
    store.check()
    name = store.find(where.resume)
    marker = store.read_marker(name)
    saved = store_config(store, name, marker)
    keys = configs.flat_keys(given)
    for section in ("model", "strategy"):  # another family or strategy: its keys differ too
        key = f"{section}.name"
        # a user's model is saved by its import path (`--model my_nets:Net` gives it again)
        trained = saved[section].get("name", saved[section].get("class_path"))
        if key in keys and str(keys[key]).strip() != str(trained):
            raise ConfigError(_refusal(name, key, trained, keys[key]))
        if key in keys and "name" not in saved[section]:
            given[section].pop("name")  # said again: not a second way of naming the model
            keys.pop(key)
    base = {k: v for k, v in saved.items() if k not in ("resources", "tracking", "resume")}
    merged = values.merged(base, given)
    config = configs.from_dict(merged)
    before, after = configs.flat_keys(saved), config.flat()
    notes = []
    for key in keys:
        if not key.startswith(TRAINED) or after.get(key) == before.get(key):
            continue
        if key not in MAY_CHANGE:
            raise ConfigError(_refusal(name, key, before.get(key), after.get(key)))
        notes.append(f"resuming {name}: {key} is now {after[key]} (it was {before.get(key)})")
    config.resume = name
    _check_recorded(marker, name, config)
    return config, notes


def _check_recorded(marker: dict[str, Any], name: str, config: RunConfig) -> None:
    """The MLflow run the marker names is in the command's tracking store: checked here,
    before Ray starts, not when the resumed run opens it."""
    from pathlib import Path

    from pipelines.errors import TrackingUnreachable, redact
    from pipelines.tracking import absolute_uri, check_store, recorded_run

    run_id = marker.get("mlflow_run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"{name}: its {RUN_FILE} names no MLflow run; it cannot be resumed")
    uri = absolute_uri(config.tracking.uri)
    check_store(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # (opening it would create it: a refused command writes nothing)
        raise ConfigError(f"--resume: the run's MLflow run {run_id} is not in the tracking store "
                          f"{redact(uri)}, which does not exist (pass the --tracking-uri it was recorded in)")
    try:
        recorded_run(uri, run_id)
    except TrackingUnreachable as e:
        raise ConfigError(str(e)) from None


def check_matches(config: RunConfig, name: str, store: Store) -> None:
    """For a config built in Python: refuse to resume run `name` as something else."""
    before, after = configs.flat_keys(store_config(store, name)), config.flat()
    for key, value in after.items():
        if key.startswith(TRAINED) and key not in MAY_CHANGE and key in before and before[key] != value:
            raise ConfigError(_refusal(name, key, before[key], value))


def store_config(store: Store, name: str, marker: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config in run `name`'s marker (`marker`, when the caller has read it)."""
    marker = store.read_marker(name) if marker is None else marker
    saved = marker.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{name}: its {RUN_FILE} holds no run config; it cannot be resumed")
    strategy = saved.get("strategy")
    if isinstance(strategy, dict) and strategy.get("name") == "allreduce":
        strategy.pop("keep_checkpoints", None)  # resources.keep_checkpoints since the packages
    return saved


def _refusal(name: str, key: str, was: Any, asked: Any) -> str:
    return (f"--resume {name}: the run was trained with {key}={was}, this command asks for "
            f"{key}={asked}; drop that setting to continue the run, or start a new run")

"""A sweep: a base run config, a search space over its keys, the metric, search and scheduler.

Each file under `tune_configs/` holds one:

    base:                        # a run config, the same schema as `raydeep run`
      model: {name: mlp}
      strategy: {name: local}
      optim: {epochs: 8}
    space:                       # dotted run-config keys -> a distribution
      model.depth: {grid: [1, 2, 4]}
      model.width: {choice: [64, 256]}
      optim.lr: {loguniform: [0.001, 0.3]}
    metric: val_accuracy         # a per-epoch metric of the model (train_loss, val_*)
    mode: max
    samples: 4                   # draws of the space (each grid point gets this many)
    search: random               # random (grid axes crossed) or {name: optuna, seed: 0}
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
    trial: {cpus: 1}             # the trial's own process; strategies add their actors
    seeds: [0, 1, 2]             # optional: each draw trains once per seed, judged by its mean

With `seeds`, a draw of the space is one configuration trained once per seed (the split, the
initial weights and the data order change with it; the drawn values stay): the best is the
configuration whose mean metric over its seeds is best, not the luckiest single run. On a
small validation split one run's metric moves more with the seed than with most settings.

A `choice` may hold lists or whole sections (`strategy: {choice: [{name: ps, shards: 2},
...]}`): Tune and Optuna see them as their YAML text, the trial reads them back. Everything
is checked before Ray starts, and every error names the file and the key.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines import config as run_configs
from pipelines.config import ConfigError, RunConfig

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS: dict[str, dict[str, Any]] = {
    "fifo": {},
    "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": None},
    "pbt": {"perturbation_interval": 1, "quantile_fraction": 0.25, "mutate": None, "synch": False},
}
"""Each scheduler's settings and their defaults (`max_t` defaults to the epochs; PBT mutates
the space's `optim.*` axes unless `mutate` lists others; `synch` makes every trial wait for the
others at each perturbation, which makes exploits certain at the cost of idle time)."""
SEARCHES: dict[str, dict[str, Any]] = {"random": {"seed": None}, "optuna": {"seed": 0}}
TOP_KEYS = ("base", "space", "metric", "mode", "samples", "search", "scheduler", "trial",
            "max_concurrent", "name", "seeds")
SEED_KEY = "seed"
"""The run-config key that `seeds` sweeps (a grid axis the sweep adds itself)."""


@dataclass
class Axis:
    """One swept key and its distribution."""

    key: str
    kind: str
    values: list

    @property
    def encoded(self) -> bool:
        """Options that are lists or mappings travel as YAML text (Optuna takes scalars only)."""
        return self.kind in ("choice", "grid") and any(isinstance(v, (list, dict)) for v in self.values)

    def probes(self) -> list:
        """Values that stand for the whole axis when the schema checks it."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def domain(self):
        from ray import tune

        options = [self.param(v) for v in self.values]
        if self.kind == "choice":
            return tune.choice(options)
        if self.kind == "grid":
            return tune.grid_search(options)
        low, high = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform,
                "randint": tune.randint}[self.kind](low, high)

    def param(self, value: Any) -> Any:
        """A value of this axis as Tune carries it."""
        return _text(value) if self.encoded else value

    def decode(self, sampled: Any) -> Any:
        return yaml.safe_load(sampled) if self.encoded else sampled


@dataclass
class SweepConfig:
    path: str
    name: str
    base: dict
    """The base run config as a nested dict (CLI overrides applied)."""
    space: list[Axis]
    metric: str
    mode: str
    samples: int = 1
    search: str = "random"
    search_options: dict = field(default_factory=dict)
    scheduler: str = "fifo"
    scheduler_options: dict = field(default_factory=dict)
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    max_concurrent: int | None = None
    seeds: list[int] = field(default_factory=list)
    """Seeds each configuration trains with (`seed` is then the space's last axis, a grid);
    empty: one run per configuration, at the base's seed."""

    def configuration(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's values under their dotted keys but its seed: what its seeds share."""
        return {k: v for k, v in self.flat_params(params).items() if not (self.seeds and k == SEED_KEY)}

    def run_config(self, params: dict[str, Any]) -> RunConfig:
        """The base config with one trial's sampled values (nested as Tune gives them, or
        under their dotted keys)."""
        raw = copy.deepcopy(self.base)
        for key, value in self.decoded(params).items():
            run_configs.apply_override(raw, key, value)
        return run_configs.from_dict(raw)

    def param_space(self) -> dict[str, Any]:
        """Tune's search space, nested by the dotted keys (Tune's own separator is `/`)."""
        return _nest({axis.key: axis.domain() for axis in self.space})

    def flat_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's sampled values under their dotted keys, as Tune carries them."""
        found = {}
        for axis in self.space:
            node: Any = params
            if axis.key in params:
                found[axis.key] = params[axis.key]
                continue
            for part in axis.key.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is not _MISSING:
                found[axis.key] = node
        return found

    def decoded(self, params: dict[str, Any]) -> dict[str, Any]:
        axes = {a.key: a for a in self.space}
        return {k: axes[k].decode(v) for k, v in self.flat_params(params).items()}

    def mutations(self) -> dict[str, Any]:
        """PBT's hyperparam_mutations: the axes it may perturb, as Tune domains or lists."""
        keys = self.scheduler_options.get("mutate") or [
            a.key for a in self.space if a.key.startswith("optim.")]
        axes = {a.key: a for a in self.space}
        return _nest({k: (axes[k].domain() if axes[k].kind not in ("choice", "grid")
                          else [axes[k].param(v) for v in axes[k].values]) for k in keys})


def load(path: str | Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None,
         *, samples: int | None = None, scheduler: str | None = None, search: str | None = None,
         max_concurrent: int | None = None) -> SweepConfig:
    """Read and check a sweep file; the keyword arguments are the `raydeep tune` flags."""
    where = str(path)
    raw = run_configs.load_yaml(path)

    def fail(message: str) -> None:
        raise ConfigError(f"{where}: {message}")

    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        fail(f"unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS)})")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        fail(f"base must be a run config mapping, got {base!r}")
    base = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        run_configs.apply_override(base, key, value)
    for assignment in sets or []:
        run_configs.apply_override(base, *run_configs.parse_set(assignment))
    try:
        run_configs.from_dict(copy.deepcopy(base))
    except ConfigError as e:
        fail(f"base: {e}")

    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict) or not space_raw:
        fail("space must map run-config keys to distributions, e.g. optim.lr: {loguniform: [0.001, 0.1]}")
    space = [_axis(key, spec, fail) for key, spec in space_raw.items()]
    seeds = _seeds(raw.get("seeds"), space, fail)
    if seeds:
        space.append(Axis(SEED_KEY, "grid", seeds))

    search_name, search_options = _named(raw.get("search", "random"), "search", SEARCHES, fail)
    if search is not None:
        search_name, search_options = _named(search, "search", SEARCHES, fail)
    scheduler_name, scheduler_options = _named(raw.get("scheduler", "fifo"), "scheduler", SCHEDULERS, fail)
    if scheduler is not None and scheduler != scheduler_name:
        scheduler_name, scheduler_options = _named(scheduler, "scheduler", SCHEDULERS, fail)
    trial = raw.get("trial") or {}
    if not isinstance(trial, dict) or set(trial) - {"cpus", "gpus"}:
        fail(f"trial must be a mapping with cpus and/or gpus, got {trial!r}")
    sweep = SweepConfig(
        path=where, name=str(raw.get("name") or Path(where).stem), base=base, space=space,
        metric=str(raw.get("metric", "")), mode=str(raw.get("mode", "")),
        samples=samples if samples is not None else raw.get("samples", 1),
        search=search_name, search_options=search_options,
        scheduler=scheduler_name, scheduler_options=scheduler_options,
        trial_cpus=trial.get("cpus", 1.0), trial_gpus=trial.get("gpus", 0.0),
        max_concurrent=max_concurrent if max_concurrent is not None else raw.get("max_concurrent"),
        seeds=seeds)
    _check(sweep, fail)
    return sweep


def _seeds(value: Any, space: list[Axis], fail) -> list[int]:
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) < 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            or len(set(value)) != len(value)):
        fail(f"seeds must list two or more different integers >= 0, got {value!r}")
    if any(a.key == SEED_KEY for a in space):
        fail("seed is swept by seeds: drop space.seed (or seeds)")
    return list(value)


def _axis(key: Any, spec: Any, fail) -> Axis:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        fail(f"{where} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in DISTRIBUTIONS:
        fail(f"{where}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list) or not values:
        fail(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        return Axis(str(key), kind, values)
    if len(values) != 2 or not all(_number(v) for v in values):
        fail(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
    low, high = (float(v) for v in values)
    if low > high or (kind == "randint" and low >= high):
        fail(f"{where}: low ({values[0]}) {'>' if low > high else '>='} high ({values[1]})")
    if kind == "loguniform" and low <= 0:
        fail(f"{where}: loguniform needs low > 0, got {values[0]}")
    if kind == "randint":
        if not all(float(v).is_integer() for v in values):
            fail(f"{where}: randint needs integers, got {values!r}")
        return Axis(str(key), kind, [int(low), int(high)])  # high is exclusive, as in Tune
    return Axis(str(key), kind, [low, high])


def _named(spec: Any, what: str, known: dict[str, dict], fail) -> tuple[str, dict]:
    """`asha` or `{name: asha, grace_period: 2}`: the name and its settings over the defaults."""
    options = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name = options.pop("name", None)
    if not isinstance(name, str):  # a list or a mapping is no name (and cannot be looked up)
        fail(f"{what} must be a name ({', '.join(known)}) or a mapping with one, got {spec!r}")
    if name not in known:
        fail(f"{what} {name!r} is unknown (known: {', '.join(known)})")
    extra = [k for k in options if k not in known[name]]
    if extra:
        fail(f"{what}.{extra[0]} is not a setting of {name} (settings: {', '.join(known[name]) or 'none'})")
    return name, {**known[name], **options}


def _check(sweep: SweepConfig, fail) -> None:
    from pipelines.run import prepare

    try:
        run_configs.check_plain_name("name", sweep.name)
    except ConfigError as e:
        fail(str(e).replace("tracking.run_name", "name"))
    if not isinstance(sweep.samples, int) or isinstance(sweep.samples, bool) or sweep.samples < 1:
        fail(f"samples must be an integer >= 1, got {sweep.samples!r}")
    if sweep.mode not in ("min", "max"):
        fail(f"mode must be min or max, got {sweep.mode!r}")
    if sweep.max_concurrent is not None and (not isinstance(sweep.max_concurrent, int)
                                             or sweep.max_concurrent < 1):
        fail(f"max_concurrent must be an integer >= 1, got {sweep.max_concurrent!r}")
    if not all(_number(v) and v >= 0 for v in (sweep.trial_cpus, sweep.trial_gpus)) or sweep.trial_cpus <= 0:
        fail(f"trial.cpus must be > 0 and trial.gpus >= 0, got {sweep.trial_cpus!r}, {sweep.trial_gpus!r}")
    _check_settings(sweep, fail)
    if sweep.search == "optuna" and any(a.kind == "grid" for a in sweep.space):
        fail(f"{'seeds' if sweep.seeds else 'grid axes'} need search random (Optuna samples; "
             "it does not cross grids)")
    if sweep.seeds and sweep.scheduler != "fifo":
        fail(f"seeds need scheduler fifo: {sweep.scheduler} stops or copies trials one by one, "
             "so a configuration's seeds would not all run their course")
    firsts = {a.key: a.probes()[0] for a in sweep.space}
    for axis in sweep.space:
        for value in axis.probes():
            raw = copy.deepcopy(sweep.base)
            try:
                for key, first in {**firsts, axis.key: value}.items():
                    run_configs.apply_override(raw, key, first)
                prepare(run_configs.from_dict(raw))  # the model is built: its own checks run too
            except ConfigError as e:
                fail(f"space.{axis.key} = {value!r}: {e}")
    if sweep.scheduler == "pbt":
        keys = {a.key for a in sweep.space}
        outside = [k for k in sweep.scheduler_options.get("mutate") or [] if k not in keys]
        if outside:
            fail(f"scheduler.mutate names keys outside the space: {outside}")
        if not sweep.mutations():
            fail("pbt needs axes to perturb: put optim.* keys in the space or list them in scheduler.mutate")
    reported = _reported_metrics(run_configs.from_dict(copy.deepcopy(sweep.base)))
    if sweep.metric not in reported:
        fail(f"metric {sweep.metric!r} is not reported per epoch here (reported: {', '.join(reported)})")


def _check_settings(sweep: SweepConfig, fail) -> None:
    """The scheduler's and the search's settings, checked here: Ray's own constructors would
    raise them as tracebacks after the sweep's MLflow run exists."""
    o, seed = sweep.scheduler_options, sweep.search_options.get("seed")

    def whole(key: str, least: int, allow_none: bool = False) -> None:
        value = o[key]
        if (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool)
                                              and value >= least):
            return
        fail(f"scheduler.{key} must be an integer >= {least}" + (" or null" if allow_none else "")
             + f", got {value!r}")

    if sweep.scheduler == "asha":
        whole("grace_period", 1)
        whole("max_t", 1, allow_none=True)
        if not (_number(o["reduction_factor"]) and o["reduction_factor"] > 1):
            fail(f"scheduler.reduction_factor must be a number > 1, got {o['reduction_factor']!r}")
        if o["max_t"] is not None and o["grace_period"] > o["max_t"]:
            fail(f"scheduler.grace_period ({o['grace_period']}) exceeds scheduler.max_t ({o['max_t']})")
    if sweep.scheduler == "pbt":
        whole("perturbation_interval", 1)
        if not (_number(o["quantile_fraction"]) and 0 < o["quantile_fraction"] <= 0.5):
            fail(f"scheduler.quantile_fraction must be in (0, 0.5] (the top and bottom fractions "
                 f"swap weights), got {o['quantile_fraction']!r}")
        if not isinstance(o["synch"], bool):
            fail(f"scheduler.synch must be true or false, got {o['synch']!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        fail(f"search.seed must be an integer >= 0, got {seed!r}")


def _reported_metrics(run: RunConfig) -> list[str]:
    """The per-epoch metrics a run of this config reports: train_loss and val_* of its model."""
    import torch

    from pipelines.run import prepare

    data, model = prepare(run)
    with torch.no_grad():
        model.eval()
        keys = model.evaluate(data.sample(2))
    return ["train_loss", *(f"val_{k}" for k in keys if k not in ("count", "steps"))]


_MISSING = object()


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        run_configs.apply_override(nested, key, value)
    return nested


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()

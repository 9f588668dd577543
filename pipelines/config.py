"""The run config: typed sections with their defaults, loaded from YAML and overridden.

One `RunConfig` drives a run whether it comes from the CLI or the Python API. A config is
built from a nested dict (a YAML file, then flags, then ``--set a.b=v`` overrides) and is
checked before anything starts: an unknown key, a value of the wrong type or an impossible
size raises `ConfigError` naming the key and the value.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import models
from models.targets import TASKS
from pipelines import imported_model, recipes, registry
from pipelines.errors import ConfigError
from pipelines.imported_model import looks_like_path
from pipelines.optim_config import OPTIMIZERS, OptimSection  # noqa: F401 (the schema's, imported from here)
from pipelines.sequence_config import SOURCES as SEQUENCE_SOURCES
from pipelines.sequence_config import SequenceSection, family_problems
from pipelines.values import Text, coerce, flat_keys  # noqa: F401 (flat_keys: the schema's, imported from here)
from pipelines.yaml_files import load_yaml


@dataclass
class ModelSection:
    name: str = "mlp"
    """A registered model family (`raydeep models` lists them), or the name of a user's
    model given by import path (`model.class_path`, `pipelines.imported_model`)."""
    params: Any = None
    """The family's own hyper-parameters (its config dataclass), given beside `name`; for a
    user's model, its `ImportedModel` (class_path, init_args, code_dir)."""


@dataclass
class DataSection:
    source: str = "digits"
    """`digits` (bundled), `synthetic`, the sequence sources `lgssm` and `healing-digits`
    (`pipelines.sequences`), or a Parquet or CSV table: a file, a directory or glob of files,
    on this machine or an object store (`s3://bucket/data/`)."""
    label: str = "label"
    """Label column of a Parquet/CSV file."""
    task: Optional[str] = None
    """classification or regression (squared error on the standardised label; MSE, RMSE,
    MAE and R² reported); default: regression for a float label column, classification
    for integer, string and boolean labels, and for digits and synthetic data."""
    val_source: Optional[str] = None
    """The validation split, a table as `source` names one (same feature columns, only
    labels the training table has); default: drawn from `source` by `val_fraction`."""
    test_source: Optional[str] = None
    """The test split, likewise; default: drawn from `source` by `test_fraction`."""
    standardize: Optional[bool] = None
    """Standardise each feature by the training split's mean and standard deviation (the
    logged model applies it to raw inputs); default: on for tables, off for digits and
    synthetic data (pixels and blobs already share one scale)."""
    input_shape: Optional[list[int]] = None
    """View each example's features as this shape, e.g. [1, 28, 28] or [28, 28]."""
    stream: bool = False
    """Read a table's training rows through Ray Data in every epoch instead of holding them
    in memory (`pipelines.streaming`): for tables larger than memory."""
    batch_size: int = 64
    """Global batch size: split evenly over the data-parallel workers."""
    test_fraction: float = 0.2
    """Held-out test split (stratified, fixed by the seed)."""
    val_fraction: float = 0.1
    """Validation split, taken from what is left after the test split."""
    synthetic_samples: int = 4096
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    synthetic_classes: int = 10
    sequences: SequenceSection = field(default_factory=SequenceSection)
    """Sequence data for a sequence family (`pipelines.sequence_config`)."""


@dataclass
class StrategySection:
    name: str = "allreduce"
    """A registered strategy (`raydeep strategies` lists them)."""
    options: Any = None
    """The strategy's own options (its `Strategy.options` dataclass), given beside `name`."""


@dataclass
class ResourcesSection:
    workers: int = 2
    """Data-parallel workers."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    """GPUs per worker; > 0 trains on CUDA (NCCL for allreduce)."""
    address: Optional[str] = None
    """Ray cluster to connect to (`auto`, `ray://host:10001`); default: an embedded local Ray."""
    num_cpus: Optional[int] = None
    """CPUs of the embedded local Ray (default: all of this machine's)."""
    storage_path: str = "raydeep_runs"
    """Where checkpoints and run state are kept: a path, or an object-store URI that pyarrow
    opens (s3://bucket/runs, gs://...; options in its query, e.g. ?endpoint_override=host:9000)."""
    keep_checkpoints: int = 2
    """Checkpoints kept per run (the newest ones), for every strategy."""
    shared_storage: bool = False
    """The user vouches that `storage_path` and a SQLite tracking URI are on storage every
    node of a multi-node cluster sees (an NFS mount); without it raydeep refuses a local path
    on more than one node instead of losing checkpoints on a worker's disk."""
    link_mbps: float = 0.0
    """A slow link between the data-parallel workers, in megabits per second, made real on
    one machine (`pipelines.training.link`): allreduce, ps and diloco wait the time their
    bytes would take over it. 0: no throttle."""
    pack: bool = False
    """Place a strategy's actors with PACK (fewest nodes) instead of SPREAD (one per node
    where it fits): SPREAD survives a node's loss and uses every node's NIC, PACK keeps
    traffic on one machine."""


@dataclass
class TrackingSection:
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; a relative SQLite path is taken from the working directory."""
    experiment: str = "raydeep"
    run_name: Optional[str] = None
    """Name of the run (default: model-strategy-timestamp)."""
    log_model: bool = True
    """Log the trained model as an MLflow model."""
    figures: bool = True
    """Draw the run's figures into MLflow (loss curve, confusion matrix, first-layer filters,
    the family's pictures, the strategy's own: pipeline timeline, staleness histogram). Off
    saves about a second of the driver's CPU per run: a sweep of many short trials."""
    grad_norms: bool = False
    """Log each layer's mean gradient norm per epoch and draw them (vanishing gradients)."""


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    seed: int = 0
    """Seeds the split, the initial weights and the data order: same seed, same run."""
    resume: Optional[str] = None
    """Continue the named run from its last checkpoint (`latest`: the newest one)."""
    recipe: Optional[str] = None
    """The recipe laid under this config by `load` (`pipelines.recipes`), as family/strategy;
    None: the schema's defaults (a user's module, `recipe: false`, a config built by `from_dict`)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def flat(self) -> dict[str, Any]:
        """Every value under its dotted key, as logged to MLflow."""
        return flat_keys(self.to_dict())


# --- building from dicts -------------------------------------------------------------

def from_dict(raw: dict[str, Any] | None) -> RunConfig:
    """Build and check a `RunConfig` from a nested dict such as a parsed YAML file."""
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
    config = _build(RunConfig, raw, "", open_sections={"model", "strategy"})
    config.model = _build_open(config.model, raw.get("model") or {}, "model", _model_params)
    config.strategy = _build_open(
        config.strategy, raw.get("strategy") or {}, "strategy", _strategy_params
    )
    config.resources.storage_path = local_storage(config.resources.storage_path)
    validate(config)
    return config


def local_storage(location: str) -> str:
    """`file:///dir` as the path `/dir`: pyarrow opens it as a local filesystem with no
    bucket, and everything that tells object stores from paths ("://") must see a path."""
    if not location.lower().startswith("file://"):
        return location
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query:
        raise ConfigError(f"resources.storage_path {location!r}: a file URI names a directory of "
                          "this machine as file:///absolute/path (or give the path itself)")
    return unquote(parts.path)


def _model_params(name: str) -> type:
    try:
        return models.get(name).config
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def _strategy_params(name: str) -> type:
    try:
        return registry.get(name).options
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def _build_open(section, raw: dict, key: str, params_type) -> Any:
    """A section whose keys beyond `name` are the chosen family's own parameters."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {key!r} must be a mapping, got {raw!r}")
    raw = dict(raw)
    if key == "model" and ("class_path" in raw or looks_like_path(str(raw.get("name", "")))):
        return ModelSection(*imported_model.from_section(raw))
    name = coerce(raw.pop("name", section.name), str, f"{key}.name")
    cls = params_type(name)
    built = _build(cls, raw, key)
    return ModelSection(name, built) if key == "model" else StrategySection(name, built)


def _build(cls: type, raw: dict, prefix: str, open_sections: set[str] = frozenset()) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"unknown config key {dotted!r} (known here: {known})")
        if key in open_sections:
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, dotted)
        else:
            kwargs[key] = coerce(value, hint, dotted)
    return cls(**kwargs)


def to_dict(config: Any) -> Any:
    if isinstance(config, (ModelSection, StrategySection)):
        own = config.params if isinstance(config, ModelSection) else config.options
        if isinstance(own, imported_model.ImportedModel):
            return own.to_dict()
        params = dataclasses.asdict(own) if own is not None else {}
        return {"name": config.name, **params}
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    return config


# --- loading and overriding --------------------------------------------------------

def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `raw[a][b] = value` for the key `a.b`, creating sections as needed."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad config key {dotted!r}")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_set(assignment: str) -> tuple[str, Text]:
    """Split one ``--set a.b=v`` into its key and its (still textual) value."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} needs the form key=value, e.g. optim.lr=0.05")
    key, _, value = assignment.partition("=")
    return key.strip(), Text(value.strip())


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         sets: list[str] | None = None) -> RunConfig:
    """YAML file (optional), then `overrides` by dotted key, then ``--set`` assignments, over
    the family's recipe (`pipelines.recipes`)."""
    raw, recipe = recipes.lay_under(load_raw(path, overrides, sets), ModelSection.name, StrategySection.name)
    config = from_dict(raw)
    config.recipe = recipe
    return config


def load_raw(path: str | None = None, overrides: dict[str, Any] | None = None,
             sets: list[str] | None = None) -> dict[str, Any]:
    """What `load` builds its config from: the nested dict of the keys given."""
    raw = load_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            apply_override(raw, key, value)
    for assignment in sets or []:
        apply_override(raw, *parse_set(assignment))
    return raw


# --- checks ----------------------------------------------------------------------------

def validate(config: RunConfig) -> None:
    """Sizes and ranges that no run could satisfy; strategies add their own checks."""
    d, o, r = config.data, config.optim, config.resources

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(r.workers >= 1, f"resources.workers must be >= 1, got {r.workers}")
    need(r.cpus_per_worker > 0, f"resources.cpus_per_worker must be > 0, got {r.cpus_per_worker}")
    need(r.gpus_per_worker >= 0, f"resources.gpus_per_worker must be >= 0, got {r.gpus_per_worker}")
    need(r.num_cpus is None or r.num_cpus >= 1, f"resources.num_cpus must be >= 1, got {r.num_cpus}")
    need(r.keep_checkpoints >= 1, f"resources.keep_checkpoints must be >= 1, got {r.keep_checkpoints}")
    need(r.link_mbps >= 0, f"resources.link_mbps must be >= 0 (0: no throttle), got {r.link_mbps}")
    throttled = [n for n in registry.names() if registry.get(n).sends_over_link]
    need(r.link_mbps == 0 or config.strategy.name in throttled,
         f"resources.link_mbps throttles the workers' exchanges of {', '.join(throttled[:-1])} and {throttled[-1]}; "
         f"{config.strategy.name} has none it models")
    need(r.storage_path.strip() != "", "resources.storage_path must not be empty (default: raydeep_runs)")
    need(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    need(0 < d.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    need(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    need(d.input_shape is None or len(d.input_shape) >= 1,
         "data.input_shape must hold at least one size (or be unset for the data's own shape)")
    need(d.input_shape is None or all(s >= 1 for s in d.input_shape),
         f"data.input_shape must hold positive sizes, got {d.input_shape}")
    need(d.synthetic_samples >= 10, f"data.synthetic_samples must be >= 10, got {d.synthetic_samples}")
    need(d.synthetic_classes >= 2, f"data.synthetic_classes must be >= 2, got {d.synthetic_classes}")
    need(bool(d.synthetic_shape) and all(s >= 1 for s in d.synthetic_shape),
         f"data.synthetic_shape must hold positive sizes, got {d.synthetic_shape}")
    problems = o.problems()
    need(not problems, problems[0] if problems else "")
    need(o.precision != "fp16" or r.gpus_per_worker > 0,
         "optim.precision fp16 needs a GPU (resources.gpus_per_worker > 0): float16 autocast on a CPU "
         "is slow and its gradient scaler is CUDA's; use bf16")
    need(d.source.strip() != "", "data.source must not be empty (digits, synthetic, or a Parquet or CSV file)")
    for key in ("val_source", "test_source"):
        given = getattr(d, key)
        need(given is None or given.strip() != "", f"data.{key} must not be empty (a Parquet or CSV table)")
        need(given is None or d.source not in GENERATED_SOURCES,
             f"data.{key} needs data.source to be a table too: {d.source} is split by its own seed")
    need(d.task is None or d.task in TASKS, f"data.task must be {' or '.join(TASKS)}, got {d.task!r}")
    need(d.task != "regression" or d.source not in GENERATED_SOURCES,
         f"data.task regression needs a table with a numeric label column: {d.source} holds classes")
    need(not d.stream or d.source not in GENERATED_SOURCES,
         f"data.stream needs data.source to be a table (Parquet or CSV files): {d.source} is generated in memory")
    streaming = [n for n in registry.names() if registry.get(n).streams]
    need(not d.stream or config.strategy.name in streaming,
         f"data.stream works under {', '.join(streaming[:-1])} and {streaming[-1]}; {config.strategy.name} "
         "reads its training rows from memory (drop data.stream)")
    if not isinstance(config.model.params, imported_model.ImportedModel):
        families = [n for n in models.names() if models.get(n).sequences]
        problems = family_problems(config.model.name, config.model.name in families, d.source, d.sequences,
                                   families, d.stream)
        need(not problems, problems[0] if problems else "")
    problems = d.sequences.problems()
    need(not problems, problems[0] if problems else "")
    need(not config.tracking.experiment.strip() == "", "tracking.experiment must not be empty")
    # The split's RandomState takes 32 bits: its own message would name numpy's limit.
    need(0 <= config.seed <= MAX_SEED, f"seed must be an integer in 0..{MAX_SEED}, got {config.seed}")
    if config.tracking.run_name is not None:
        check_plain_name("tracking.run_name", config.tracking.run_name)
    need("://" in config.tracking.uri,
         f"tracking.uri {config.tracking.uri!r} is not a URI (e.g. sqlite:///mlflow.db, http://host:5000)")
    registry.get(config.strategy.name).validate(config)


def check_plain_name(key: str, name: str) -> None:
    """A run's or sweep's name is a directory under the storage path: one plain path part."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise ConfigError(f"{key} {name!r} must be a plain name (no '/', '\\', '..' or surrounding "
                          "spaces): it names a directory under resources.storage_path")


MAX_SEED = 2**32 - 1

GENERATED_SOURCES = ("digits", "synthetic", *SEQUENCE_SOURCES)  # not tables: made in memory

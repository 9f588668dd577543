"""`train(config) -> Result`: the one entry point the CLI, Tune and users share."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import data as datasets
from pipelines import figures, object_store, startup
from pipelines import strategy as strategies
from pipelines.config import ConfigError, RunConfig
from pipelines.loop import evaluate_sums, mean_metrics
from pipelines.tracking import Tracker, absolute_uri

RUN_FILE = "raydeep_run.json"


class RunFailed(RuntimeError):
    """A run that started and then failed; it is marked FAILED in MLflow."""

    def __init__(self, message: str, run_id: str):
        super().__init__(message)
        self.run_id = run_id


@dataclass
class Result:
    run_id: str
    run_name: str
    metrics: dict[str, float]
    """Final metrics: test_loss, test_accuracy and the strategy's own figures."""
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = None
    run_dir: Path | None = None


def prepare(config: RunConfig) -> tuple[datasets.Dataset, nn.Module]:
    """Everything that can reject the run before any process starts: data and model shape."""
    data = datasets.load(config.data, config.seed)
    try:
        model = strategies.build_model(config, data.input_shape, data.num_classes)
        with torch.no_grad():
            model.eval()
            model.evaluate((data.x_val[:2] if len(data.y_val) else data.x_train[:2],
                            data.y_val[:2] if len(data.y_val) else data.y_train[:2]))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"model {config.model.name} (input shape {list(data.input_shape)}): "
            f"{str(e).splitlines()[0]}") from None
    strategies.get(config.strategy.name).check_model(config, model)
    storage = config.resources.storage_path
    if object_store.is_uri(storage):
        object_store.check_reachable(storage)
        if config.resume:
            object_store.find_resumable(storage, config.resume, RUN_FILE)
    elif config.resume:
        find_resumable(Path(storage).absolute(), config.resume)
    return data, model


def train(config: RunConfig, data: datasets.Dataset | None = None, *,
          tracker: Tracker | None = None, run_dir: Path | None = None) -> Result:
    """Train as `config` says, record it in MLflow, and return the final metrics and model.

    `data` is the result of `prepare(config)` when the caller has checked the run already.
    A caller that keeps the MLflow run and the run's directory itself (a Tune trial) passes
    `tracker` and `run_dir`.

    Its start-up timeline is measured from the launch the CLI recorded (`startup.launched`),
    or else from this call.
    """
    startup.launch_time()
    try:
        return _train(config, data, tracker, run_dir)
    finally:
        startup.forget()  # a later call in this process is a launch of its own


def _train(config: RunConfig, data: datasets.Dataset | None, tracker: Tracker | None,
           run_dir: Path | None) -> Result:
    if data is None:
        data, _ = prepare(config)
    strategy = strategies.get(config.strategy.name)
    if tracker is None or run_dir is None:
        run_dir, tracker = _open_run(config, data)
    elif not tracker.launched_at:  # a Tune trial's own tracker
        tracker.launched_at = startup.launch_time()
    try:
        fit = strategy.fit(config, data, tracker, run_dir)
        model = strategies.build_model(config, data.input_shape, data.num_classes)
        model.load_state_dict(fit.state_dict)
        final = {**mean_metrics(evaluate_sums(model, data.x_test, data.y_test), "test"),
                 "num_params": float(sum(p.numel() for p in model.parameters())), **fit.summary}
        tracker.log_metrics(final)
        history = fit.history or tracker.epoch_history()
        _log_figures(tracker, model, data, history)
        if config.tracking.log_model:
            tracker.log_model(model, data.x_test[:4].numpy())
        tracker.finish("FINISHED")
    except KeyboardInterrupt:
        tracker.finish("KILLED", "interrupted by the user")
        raise
    except Exception as e:
        message = _one_line(e)
        tracker.finish("FAILED", message)
        raise RunFailed(message, tracker.run_id) from e
    return Result(tracker.run_id, run_dir.name, final, history, model, run_dir)


def run_tags(config: RunConfig, data: datasets.Dataset) -> dict[str, str]:
    return {"raydeep.model": config.model.name, "raydeep.strategy": config.strategy.name,
            "raydeep.data": data.name}


def _open_run(config: RunConfig, data: datasets.Dataset) -> tuple[Path, Tracker]:
    """The run's directory and its MLflow run: new, or the earlier one of a resumed run."""
    uri = absolute_uri(config.tracking.uri)
    on_store = object_store.is_uri(config.resources.storage_path)
    run_dir, previous, mirror = (_staged_run_directory if on_store else _run_directory)(config)
    if previous:
        tracker = Tracker.reopen(uri, previous["mlflow_run_id"], config.optim.epochs)
        tracker.mirror = mirror
        _log_startup(tracker)
        return run_dir, tracker
    tracker = Tracker.start(uri, config.tracking.experiment, run_dir.name, config.flat(),
                            tags=run_tags(config, data), epochs=config.optim.epochs)
    tracker.mirror = mirror
    marker = json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": uri,
                         "config": config.to_dict()}, indent=1)
    (run_dir / RUN_FILE).write_text(marker)
    if mirror:
        object_store.write_text(object_store.join(mirror, RUN_FILE), marker)
    _log_startup(tracker)
    return run_dir, tracker


def _log_startup(tracker: Tracker) -> None:
    """Give the run its launch time and log the marks the driver took before it existed."""
    tracker.launched_at = startup.launch_time()
    startup.mark("run_open")
    tracker.log_startup(startup.marks())


def _staged_run_directory(config: RunConfig) -> tuple[Path, dict[str, Any] | None, str]:
    """A run kept on an object store: (local staging directory, the earlier run's marker
    when resuming, the run's URI). A resumed run's newest checkpoint is downloaded first."""
    storage = config.resources.storage_path
    if config.resume:
        name = object_store.find_resumable(storage, config.resume, RUN_FILE)
        mirror = object_store.join(storage, name)
        run_dir = object_store.staging_dir(storage, name)
        newest = object_store.checkpoints(mirror)[:1]
        object_store.download(mirror, [RUN_FILE, *(n for _, n in newest)], run_dir)
        return run_dir, json.loads((run_dir / RUN_FILE).read_text()), mirror
    name = _new_run_name(config)
    mirror = object_store.join(storage, name)
    if object_store.exists(object_store.join(mirror, RUN_FILE)):
        raise ConfigError(f"tracking.run_name {name!r} already has a run under {storage}; "
                          "pick another name or pass --resume to continue it")
    return object_store.staging_dir(storage, name), None, mirror


def _new_run_name(config: RunConfig) -> str:
    return config.tracking.run_name or (
        f"{config.model.name}-{config.strategy.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _run_directory(config: RunConfig) -> tuple[Path, dict[str, Any] | None, str]:
    storage = Path(config.resources.storage_path).absolute()
    if config.resume:
        run_dir = find_resumable(storage, config.resume)
        return run_dir, json.loads((run_dir / RUN_FILE).read_text()), ""
    name = _new_run_name(config)
    run_dir = storage / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"resources.storage_path {str(storage)!r} cannot hold runs: {e.strerror}") from None
    if (run_dir / RUN_FILE).exists():
        raise ConfigError(
            f"tracking.run_name {name!r} already has a run under {storage}; "
            "pick another name or pass --resume to continue it")
    return run_dir, None, ""


def find_resumable(storage: Path, name: str, marker: str = RUN_FILE, prefix: str = "",
                   what: str = "run") -> Path:
    """The directory under `storage` that `--resume NAME` means: the one called `name`, or
    for `latest` the newest whose name starts with `prefix`; each holds its `marker` file."""
    if name != "latest":
        found = storage / name
        if not (found / marker).is_file():
            raise ConfigError(f"--resume {name!r}: no {what} of that name under {storage}")
        return found
    earlier = sorted(storage.glob(f"{prefix}*/{marker}"), key=lambda p: p.stat().st_mtime)
    if not earlier:
        raise ConfigError(f"--resume: no earlier {what} under {storage}")
    return earlier[-1].parent


def _log_figures(tracker: Tracker, model: nn.Module, data, history) -> None:
    drawn = []
    if history:
        drawn.append(("loss_curve.png", figures.loss_curve(history)))
        if any(k.startswith("grad_norm.") for k in history[-1]):
            drawn.append(("grad_norms.png", figures.grad_norms(history)))
    model.eval()
    if getattr(model, "task", None) == "classification":
        predicted = np.concatenate([
            model.predict(data.x_test[i:i + 512]).numpy() for i in range(0, len(data.y_test), 512)])
        drawn.append(("confusion_matrix.png",
                      figures.confusion_matrix(data.y_test.numpy(), predicted, data.class_names)))
    first = _first_layer_filters(model, data.input_shape)
    if first is not None:
        drawn.append(("first_layer_filters.png", first))
    if hasattr(model, "pictures"):  # the family's own pictures: reconstructions, samples...
        with torch.no_grad():
            for name, images in model.pictures(data.x_test[:20]).items():
                drawn.append((f"{name}.png", figures.image_grid(images.cpu().clamp(0, 1), name)))
    for name, fig in drawn:
        tracker.log_figure(fig, name)
        figures.close(fig)


def _first_layer_filters(model: nn.Module, input_shape):
    """The first layer's weights drawn as images, where they have an image's shape."""
    layer = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return None  # a structured or recurrent first layer has no filters to draw
    weights = layer.weight.detach().cpu()
    if isinstance(layer, nn.Conv2d) and weights.shape[-1] > 1:
        return figures.filters(weights[:, 0], tuple(weights.shape[-2:]), "first-layer kernels")
    if isinstance(layer, nn.Linear) and len(input_shape) >= 2:
        height, width = input_shape[-2], input_shape[-1]
        if layer.in_features == height * width:
            return figures.filters(weights, (height, width), "first-layer filters (one per unit)")
    return None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()

"""`train(config) -> Result`: the one entry point the CLI, Tune and users share."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.standardize import Standardized
from pipelines import data as datasets
from pipelines import figures, imported_model, registry, resume, serving, startup
from pipelines.config import GENERATED_SOURCES, ConfigError, ModelSection, RunConfig, validate
from pipelines.context import RunContext
from pipelines.errors import InterruptedUnmarked, TrackingUnreachable, first_line, one_line
from pipelines.storage import RUN_FILE, Store, timestamped
from pipelines.tracking import Tracker, absolute_uri, check_store
from pipelines.training import early_stopping
from pipelines.training.loop import build_model, evaluate_sums, mean_metrics


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


def prepare(config: RunConfig, table: object = None) -> tuple[datasets.Dataset, nn.Module]:
    """Everything that can reject the run before any process starts: data (`table`: a
    user's `ray.data.Dataset` in place of `data.source`), model shape, storage and the run
    `--resume` names."""
    data = datasets.load(config.data, config.seed, table)
    try:
        model = build_model(config, data)
        with torch.no_grad():
            model.eval()
            reported = [f"val_{k}" for k in model.evaluate(data.sample(2)) if k not in ("count", "steps")]
        optim, reported = config.optim, ["train_loss", *reported]
        early_stopping.check_metric("optim.early_stopping.metric", optim.early_stopping.metric, reported)
        early_stopping.check_metric("optim.plateau_metric",
                                    optim.plateau_metric if optim.schedule == "plateau" else None, reported)
    except ConfigError:
        raise
    except Exception as e:  # a user's module may raise anything: one line, no traceback
        raise ConfigError(
            f"model {config.model.name} (input shape {list(data.input_shape)}): "
            f"{first_line(e)}") from None
    registry.get(config.strategy.name).check_model(config, model, data)
    check_store(config.tracking.uri)
    store = Store(config.resources.storage_path)
    store.check()
    if config.resume:
        resume.check_matches(config, store.find(config.resume), store)
    return data, model


def train(config: RunConfig, data: datasets.Dataset | None = None, *,
          context: RunContext | None = None, model: object = None, table: object = None) -> Result:
    """Train as `config` says, record it in MLflow, and return the final metrics and model.

    `model` is a user's own model to train instead of `config.model`: an `nn.Module` (its
    weights are the starting point), a module class or a factory function (called with
    `input_shape`/`num_classes` where it takes them); `models.contract` says what it offers.

    `table` is a `ray.data.Dataset` of a table's columns to train on instead of
    `data.source`: it is streamed (`data.stream`), as a streamed table's files are.

    `data` is the result of `prepare(config)` when the caller has checked the run already.
    A caller that keeps the MLflow run and the run's directory itself (a Tune trial) passes
    its `context`.

    Its start-up timeline is measured from the launch the CLI recorded (`startup.launched`),
    or else from this call.
    """
    startup.launch_time()
    if model is not None:
        config = dataclasses.replace(config, model=ModelSection(*imported_model.from_object(model)))
    if table is not None:
        if not all(callable(getattr(table, m, None)) for m in ("iter_batches", "map_batches")):
            raise ConfigError(f"table= takes a ray.data.Dataset of the table's columns, got {type(table).__name__}")
        source = config.data.source if config.data.source not in GENERATED_SOURCES else "ray.data.Dataset"
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=source, stream=True))
        validate(config)
        data, _ = prepare(config, table)
    try:
        return _train(config, data, context)
    finally:
        startup.forget()  # a later call in this process is a launch of its own


def _train(config: RunConfig, data: datasets.Dataset | None, context: RunContext | None) -> Result:
    if data is None:
        data, _ = prepare(config)
    strategy = registry.get(config.strategy.name)
    if context is None:
        context = open_run(config, data)
    elif not context.tracker.launched_at:  # a Tune trial's own tracker
        context.tracker.launched_at = startup.launch_time()
    tracker = context.tracker
    try:
        fit = strategy.fit(config, data, context)
        model = build_model(config, data)
        watched = fit.stopping or (context.stopping.state() if context.stopping.active else None)
        best, stopping, reason = early_stopping.outcome(watched)
        model.load_state_dict(best if best is not None else fit.state_dict)  # the best epoch's, if watched
        if reason:
            tracker.say(reason)
            tracker.set_tags({"raydeep.stopped_early": reason})
        final = {**mean_metrics(evaluate_sums(model, data.x_test, data.y_test), "test"), **stopping,
                 "num_params": float(sum(p.numel() for p in model.parameters())), **fit.summary,
                 **data.reference}
        tracker.log_metrics(final)
        tracker.wait_for_store("end the run")  # what it kept first; a bounded wait if the store is away
        history = fit.history or context.history or tracker.epoch_history()
        if config.tracking.figures:
            _log_figures(tracker, model, data, history)
        model, logged, example, signature = _served(model, data)
        if config.tracking.log_model:
            tracker.log_model(logged, example, imported_model.code_paths(config), signature=signature)
        tracker.finish("FINISHED")
    except TrackingUnreachable:  # the run cannot be marked: it stays RUNNING until --resume
        raise
    except KeyboardInterrupt:
        try:
            tracker.finish("KILLED", "interrupted by the user")
        except TrackingUnreachable as e:  # an interrupt still, not a failure: exit 130
            raise InterruptedUnmarked(str(e)) from None
        raise
    except Exception as e:
        message = one_line(e)
        tracker.finish("FAILED", message)
        raise RunFailed(message, tracker.run_id) from e
    return Result(tracker.run_id, context.run_dir.name, final, history, model, context.run_dir.local)


def _served(model: nn.Module, data: datasets.Dataset):
    """(the model `Result` holds, the model to log, its input example, its signature):
    on a table, both take raw columns (`Standardized`); a table of scalar columns is logged
    with their names and types (`pipelines.serving`); a regressor predicts in the target's
    units. A user's module is logged as its own class where nothing wraps it."""
    # a user's own class, unless its regression scale (raydeep's wrapper) must come along
    logged = model.unwrapped() if hasattr(model, "unwrapped") and data.task != "regression" else model
    example = data.x_test[:4]
    if data.feature_mean is None and data.task != "regression":
        return model, logged, example.numpy(), None
    mean, std = data.feature_mean, data.feature_std
    if mean is None:  # a regressor of unstandardised features: only its target is scaled
        mean, std = torch.zeros(data.input_shape), torch.ones(data.input_shape)
    model, logged = (Standardized(m, mean, std, data.input_shape) for m in (model, logged))
    raw = (example * std + mean).numpy()
    if data.columns is None:
        return model, logged, raw, None
    return model, logged, serving.example_frame(raw, data.columns), serving.signature(data.columns)


def run_tags(config: RunConfig, data: datasets.Dataset) -> dict[str, str]:
    tags = {"raydeep.model": config.model.name, "raydeep.strategy": config.strategy.name,
            "raydeep.data": data.name}
    if isinstance(config.model.params, imported_model.ImportedModel):
        tags["raydeep.model_class_path"] = config.model.params.class_path
    return tags


def open_run(config: RunConfig, data: datasets.Dataset) -> RunContext:
    """The run's directory and its MLflow run: new, or the earlier one of a resumed run
    (on an object store, its marker and newest checkpoint are downloaded first)."""
    uri = absolute_uri(config.tracking.uri)
    store = Store(config.resources.storage_path)
    if config.resume:
        run_dir = store.reopen(store.find(config.resume))
        previous = run_dir.read_json(RUN_FILE)
        tracker = Tracker.reopen(uri, previous["mlflow_run_id"], config.optim.epochs)
    else:
        # A name of the user's is refused when taken; a default one of a run started in the
        # same second as another gets the next free -2, -3...
        name = config.tracking.run_name or timestamped(f"{config.model.name}-{config.strategy.name}")
        run_dir = store.create(name, unique=not config.tracking.run_name)
        tracker = Tracker.start(uri, config.tracking.experiment, run_dir.name, config.flat(),
                                tags=run_tags(config, data), epochs=config.optim.epochs)
        run_dir.write_json(RUN_FILE, {"mlflow_run_id": tracker.run_id, "tracking_uri": uri,
                                      "config": config.to_dict()})
    run_dir.keep = config.resources.keep_checkpoints
    tracker.launched_at = startup.launch_time()
    tracker.run_name = run_dir.name  # what an absent store's error tells the user to --resume
    startup.mark("run_open")
    tracker.log_startup(startup.marks())  # the marks the driver took before the run existed
    return RunContext(config, tracker, run_dir)


def _log_figures(tracker: Tracker, model: nn.Module, data, history) -> None:
    drawn = []
    if history:
        drawn.append(("loss_curve.png", figures.loss_curve(history)))
        if any(k.startswith("grad_norm.") for k in history[-1]):
            drawn.append(("grad_norms.png", figures.grad_norms(history)))
    model.eval()
    task = getattr(model, "task", None)
    if task in ("classification", "regression"):
        predicted = np.concatenate([
            model.predict(data.x_test[i:i + 512]).numpy() for i in range(0, len(data.y_test), 512)])
        drawn.append(("confusion_matrix.png",
                      figures.confusion_matrix(data.y_test.numpy(), predicted, data.class_names))
                     if task == "classification" else
                     ("predicted_vs_true.png", figures.predicted_vs_true(data.y_test.numpy(), predicted)))
    first = _first_layer_filters(model, data.input_shape)
    if first is not None:
        drawn.append(("first_layer_filters.png", first))
    if hasattr(model, "pictures"):  # the family's own pictures: reconstructions, samples...
        columns = getattr(model, "picture_columns", 10)  # a sequence model's: one row per sequence
        with torch.no_grad():
            for name, images in model.pictures(data.x_test[:20]).items():
                drawn.append((f"{name}.png", figures.image_grid(images.cpu().clamp(0, 1), name, columns)))
    if data.test_latents is not None and hasattr(model, "posterior_means"):
        inferred = model.posterior_means(data.x_test[:200], data.y_test[:200])
        drawn.append(("latent_trajectories.png",
                      figures.latent_trajectories(data.test_latents[:200], inferred)))
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

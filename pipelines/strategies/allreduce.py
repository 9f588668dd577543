"""`allreduce`: synchronous data parallelism on Ray Train (`TorchTrainer` + DDP).

gloo on CPU, NCCL when workers hold GPUs. Every worker takes a disjoint shard of each
global batch; DDP averages the gradients, so a step equals the single-process step on the
whole global batch (tests hold it to `local` with `assert_close`). Rank 0 checkpoints every
epoch; a lost worker restarts the group from the last checkpoint (`FailureConfig`).

The end of an epoch happens inside Ray Train's workers, so it is `RunContext.epoch_done`'s
steps in Ray Train's terms: the checkpoint goes to `ray.train.report` (Ray Train writes it
into the run's directory, on an object store too, and keeps `resources.keep_checkpoints`),
then rank 0 logs the metrics; a Tune trial's reporter forwards the reports to Tune.
"""
from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipelines import imported_model
from pipelines.config import ConfigError, RunConfig
from pipelines.context import RunContext, epoch_record, log_saved_metrics
from pipelines.data import Dataset
from pipelines.registry import register
from pipelines.storage import RunDir, checkpoint_name, load_state, newest_state, save_state
from pipelines.strategies.base import FitResult, Strategy, require_even_shards
from pipelines.training import placement
from pipelines.training.early_stopping import STATE_KEY, EarlyStopping
from pipelines.training.epochs import Collective, train_epochs
from pipelines.training.placement import worker_bundle


@dataclass
class AllreduceOptions:
    max_failures: int = 3
    """Worker-group restarts (from the last checkpoint) before the run fails; -1: no limit."""
    backend: Optional[str] = None
    """torch.distributed backend; default gloo on CPU, nccl on GPU."""


class AllreduceStrategy(Strategy):
    name = "allreduce"
    sends_over_link = True
    options = AllreduceOptions
    description = "synchronous data parallelism: Ray Train TorchTrainer + DDP (gloo/NCCL)"
    bundles_in_trial = False  # Ray Train reserves its worker group itself
    streams = True

    @property
    def needs_dashboard(self) -> bool:
        # Ray Train's placement-group cleaner polls the state API; a run on a Ray of its own
        # does without the cleaner (`trainer_class`), so without the dashboard too.
        return not cleaner_can_be_left_out()

    def actor_bundles(self, run: RunConfig) -> list[dict[str, float]]:
        return [worker_bundle(run)] * run.resources.workers

    def validate(self, run: RunConfig) -> None:
        require_even_shards(run)
        options: AllreduceOptions = run.strategy.options
        if options.backend not in (None, "gloo", "nccl"):
            raise ConfigError(f"strategy.backend must be gloo or nccl, got {options.backend!r}")
        if options.backend == "nccl" and run.resources.gpus_per_worker <= 0:
            raise ConfigError("strategy.backend nccl needs resources.gpus_per_worker > 0")
        if options.max_failures < -1:  # Ray Train's FailureConfig would refuse it once Ray is up
            raise ConfigError(f"strategy.max_failures must be >= -1 (-1: no limit), got {options.max_failures}")

    def fit(self, run: RunConfig, data: Dataset, context: RunContext) -> FitResult:
        import ray
        from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, ScalingConfig
        from ray.train import RunConfig as TrainRunConfig
        from ray.train.torch import TorchConfig

        options: AllreduceOptions = run.strategy.options
        gpus = run.resources.gpus_per_worker
        tracker, run_dir = context.tracker, context.run_dir
        # A Tune trial: Ray Train forwards each epoch's report to Tune.
        callbacks = [context.reporter.ray_train_callback()] if context.reporter else []
        _start_autoscaling_coordinator()
        trainer = trainer_class(cleaner=context.reporter is not None or not driver_owns_ray(),
                                datasets=data.stream is not None)(
            _train_worker,
            train_loop_config={
                # A reference, so that only the workers (whose runtime_env carries a user's
                # model code) unpickle the config, not Ray Train's controller.
                "run": ray.put(run),
                "data": ray.put(data),
                "tracker": tracker,
                "run_dir": run_dir,
            },
            torch_config=TorchConfig(backend=options.backend or ("nccl" if gpus > 0 else "gloo")),
            **_streamed(run, data, DataConfig),
            scaling_config=ScalingConfig(num_workers=run.resources.workers, use_gpu=gpus > 0,
                                         resources_per_worker=worker_bundle(run),
                                         # Ray Train makes the group; SPREAD unless --pack
                                         placement_strategy="PACK" if run.resources.pack else "SPREAD"),
            run_config=TrainRunConfig(
                **run_dir.ray_storage(),  # Ray Train writes the checkpoints there itself
                failure_config=FailureConfig(max_failures=options.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=run.resources.keep_checkpoints),
                logging_config=LoggingConfig(log_level="WARNING"),
                callbacks=callbacks,
                worker_runtime_env=imported_model.actor_runtime_env(run),
            ),
        )
        tracker.startup("trainer_submitted")
        result = trainer.fit()
        if result.error:
            raise result.error
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as directory:
                state = load_state(directory)
        else:  # a resumed run that had no epoch left to train
            state = run_dir.newest_state()
        if state is None:
            raise RuntimeError(f"allreduce finished without a checkpoint under {run_dir.location}")
        # What rank 0 could not write while the store was away ended with its process; the
        # last checkpoint holds it (rows the store has are not added twice).
        log_saved_metrics(tracker, state)
        starts = tracker.metric_history("worker_group_start_epoch")
        summary = {"worker_restarts": float(max(len(starts) - 1, 0))}
        first = tracker.metric_history("time_to_first_step_s")
        if first and not run.resume:  # a resumed run's history holds its first start's
            summary["time_to_first_step_s"] = first[0]
        return FitResult(state["model"], tracker.epoch_history(), summary,
                         stopping=state.get("extra", {}).get(STATE_KEY))


def _streamed(run: RunConfig, data: Dataset, data_config) -> dict:
    """A streamed table's training rows as Ray Train's dataset "train": each worker reads its
    share (`get_dataset_shard`), equal row counts so every rank takes the same steps, in the
    order the files are read in (`preserve_order`: the same shards in every run)."""
    if data.stream is None:
        return {}
    from ray.data import ExecutionOptions

    return {"datasets": {"train": data.stream.training_dataset(run.seed, on_driver=False)},
            "dataset_config": data_config(datasets_to_split=["train"],
                                          execution_options=ExecutionOptions(preserve_order=True))}


def _start_autoscaling_coordinator() -> None:
    """Ray Train's controller first asks a cluster-wide actor for its workers' resources and
    waits for its reply; that actor is started on the first run of a cluster (a process that
    imports Ray Data: 4.4 s on 2 cores, measured in the controller's log). Asked for here, it
    starts while the controller's own process does, instead of after it."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray: the controller starts it as it always did
        return
    get_or_create_autoscaling_coordinator()


def driver_owns_ray() -> bool:
    """Whether this process started the Ray it runs on (an embedded `ray.init`): that Ray
    ends with this process, Ray Train's controller with it."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API says it
    return ray.is_initialized() and bool(getattr(node, "head", False))


def _cleaner_callback():
    """Ray Train's placement-group cleaner callback class, where this Ray has the seam it is
    left out through; else None."""
    return _default_callback("placement_group_callback", "PlacementGroupCleanerCallback")


def _default_callback(module: str, name: str):
    """One of Ray Train V2's default callback classes, where this Ray has the seam callbacks
    are left out through (`_create_default_callbacks`); else None."""
    import importlib

    from ray.train.torch import TorchTrainer

    try:
        found = getattr(importlib.import_module(f"ray.train.v2._internal.callbacks.{module}"), name)
    except (ImportError, AttributeError):
        return None
    return found if hasattr(TorchTrainer, "_create_default_callbacks") else None


def cleaner_can_be_left_out() -> bool:
    """Whether `trainer_class` can leave the cleaner out, asked before Ray starts: looked up
    on disk, as importing Ray Train here would cost its import (1.3 s of CPU) before `ray.init`
    instead of while Ray starts. `trainer_class` checks the class itself."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("ray.train")  # imports `ray`, not Ray Train
    if spec is None or not spec.submodule_search_locations:
        return False
    module = Path(list(spec.submodule_search_locations)[0]) / "v2/_internal/callbacks/placement_group_callback.py"
    return module.is_file()


def trainer_class(cleaner: bool, datasets: bool = True):
    """`TorchTrainer`, without its placement-group cleaner unless `cleaner`, and without its
    datasets callback unless `datasets`.

    The cleaner is a detached actor that removes the worker group's placement group if Ray
    Train's controller dies while the cluster lives on (a Tune trial stopped, a job driver
    lost on a cluster). On a Ray this driver started, the cluster ends with the driver: the
    cleaner would guard nothing, and it is a third process to start beside the two workers
    (2.4 s of the controller's start on 2 cores) which needs the dashboard's state API (11
    more processes at `ray.init`).

    The datasets callback starts a DatasetManager actor for every worker group, datasets or
    none (1.5 s of CPU on 2 cores); in-memory data gives Ray Train no dataset, and a worker
    without the callback's shard provider only cannot call `get_dataset_shard`, which its
    loop then never does.
    """
    from ray.train.torch import TorchTrainer

    left_out = tuple(c for c in (None if cleaner else _cleaner_callback(),
                                 None if datasets else _default_callback("datasets", "DatasetsCallback"))
                     if c is not None)
    if not left_out:
        return TorchTrainer

    class TorchTrainerWithoutCallbacks(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, left_out)]

    return TorchTrainerWithoutCallbacks


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    started = time.time()  # Ray Train's TorchConfig has made the process group already
    import ray
    import ray.train

    _quiet_report_logs()
    run: RunConfig = ray.get(config["run"])
    data: Dataset = ray.get(config["data"])
    timeline = {"worker_started": started, "data_on_worker": time.time()}
    tracker = config["tracker"]
    comm = ddp_collective(run.resources.link_mbps)
    _say_placement(run, tracker, comm)
    state = _restore(config)
    start = state["epoch"] + 1 if state else 0
    # every rank judges the same all-reduced metrics: all stop after the same epoch
    stopping = EarlyStopping(run.optim.early_stopping, (state or {}).get("extra", {}).get(STATE_KEY))
    # A worker's first MLflow call imports mlflow (about 2 s of CPU): rank 0 writes from a
    # thread, in order, once its first step is done. Earlier, the import would hold the GIL
    # while rank 0 builds DDP and takes that step, and every other rank waits for rank 0.
    # Each epoch's end waits for the writes made so far.
    writes, pending = ThreadPoolExecutor(max_workers=1), []
    if comm.rank == 0 and state:
        tracker.say(f"resumed from the checkpoint of epoch {start}")
        log_saved_metrics(tracker, state)  # a restart between its checkpoint and its log line

    def after_epoch(epoch, metrics, model, optimizer):
        for write in pending:
            write.result()
        pending.clear()
        record = epoch_record(tracker, metrics) if comm.rank == 0 else {}
        stop = stopping.update(epoch, metrics, model.state_dict)
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if comm.rank == 0:
                save_state(tmp, epoch=epoch, model=_cpu(model.state_dict()),
                           optimizer=optimizer.state_dict(), extra={**record, **stopping.checkpoint_extra()})
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "epoch": epoch + 1}, checkpoint=saved,
                             checkpoint_dir_name=checkpoint_name(epoch))
        if comm.rank == 0:  # after the checkpoint it describes
            tracker.log_epoch(epoch, metrics, timestamp=record["logged_at"])
        return stop

    def first_step():
        if comm.rank != 0:
            return
        timeline["first_step"] = time.time()
        pending.append(writes.submit(tracker.log_metrics, {"worker_group_start_epoch": start},
                                     step=start))
        if not state:
            pending.append(writes.submit(tracker.log_startup, {
                name: tracker.since_launch(at) for name, at in timeline.items()}))

    source = None
    if data.stream is not None:
        from pipelines.streaming import Streamed

        source = Streamed(ray.train.get_dataset_shard("train"))
    train_epochs(run, data, tracker, comm, state, after_epoch, first_step, source)


def ddp_collective(link_mbps: float = 0.0) -> Collective:
    """This Ray Train worker's rank, device, DDP wrapping (its buckets throttled to
    `link_mbps`, `training.link`) and sum over the workers."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipelines.training.link import Link, throttle_ddp

    context = ray.train.get_context()
    device = ray.train.torch.get_device()

    def all_sum(values: list[float]) -> list[float]:
        # Gathered, then added in rank order on every rank: the bits of a metric do not
        # depend on the reduction order a backend picks, so the same run logs the same values.
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        parts = [torch.empty_like(mine) for _ in range(context.get_world_size())]
        dist.all_gather(parts, mine)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.tolist()

    def wrap(model):
        return throttle_ddp(ray.train.torch.prepare_model(model), Link(link_mbps), context.get_world_size())

    return Collective(rank=context.get_world_rank(), world=context.get_world_size(), device=device,
                      wrap=wrap, sum=all_sum)


def _say_placement(run: RunConfig, tracker, comm: Collective) -> None:
    """Rank 0 logs which node each rank of this worker group runs on, as the actor
    strategies do from their placement group (Ray Train keeps its group to itself)."""
    import ray
    import torch.distributed as dist

    nodes: list = [None] * comm.world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if comm.rank == 0:
        mode = "PACK" if run.resources.pack else "SPREAD"
        tracker.say(placement.describe(nodes, [f"rank-{r}" for r in range(comm.world)], mode))


def _quiet_report_logs() -> None:
    """Ray Train logs every report at INFO from a logger outside `ray.train`; once per epoch
    per worker, that would bury the progress lines."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _restore(config: dict[str, Any]) -> dict | None:
    """The newest state: Ray Train's last registered checkpoint or the newest on storage.

    Storage can be ahead of Ray Train: a checkpoint is written before the controller
    registers it, and a worker lost in between must not send the run back to epoch 0.
    This is also how `--resume` finds the state of an earlier run of the same name.
    """
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        with registered.as_directory() as directory:
            candidates.append(load_state(directory))
    run_dir: RunDir = config["run_dir"]
    on_storage = newest_state(run_dir.location)
    if on_storage is not None:
        candidates.append(on_storage)
    return max(candidates, key=lambda state: state["epoch"], default=None)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


register(AllreduceStrategy())

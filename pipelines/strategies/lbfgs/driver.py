"""The `lbfgs` driver (Sandblaster): its actors, the coordinator, and the epoch loop around it."""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from pipelines.config import RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.strategies.base import FitResult
from pipelines.strategies.lbfgs.engine import DistributedLbfgs, Iteration, LbfgsState
from pipelines.strategies.lbfgs.pool import PortionPool
from pipelines.strategies.lbfgs.shard import LbfgsShard, ShardGroup
from pipelines.strategies.lbfgs.worker import (
    LbfgsWorker,
    epoch_examples,
    has_batch_norm,
    load_batch_norm_statistics,
    portion_bounds,
)
from pipelines.training import placement
from pipelines.training.epochs import driver_model
from pipelines.training.flat import ShardLayout, flat_parameters, load_parameters
from pipelines.training.loop import evaluate_sums, mean_metrics

if TYPE_CHECKING:
    from pipelines.strategies.lbfgs.strategy import LbfgsOptions


class Sandblaster:
    """One `lbfgs` run: its actors, the coordinator, and the epoch loop around it."""

    def __init__(self, run: RunConfig, data: Dataset, context: RunContext,
                 place: placement.Placement = placement.Placement()):
        import ray

        self.run, self.data, self.context = run, data, context
        self.tracker = tracker = context.tracker
        self.options: LbfgsOptions = run.strategy.options
        self.model, state = driver_model(run, data, context)
        self.start_epoch = state["epoch"] + 1 if state else 0
        o = self.options
        self.layout = ShardLayout.of(self.model, o.shards)
        saved = (state or {}).get("optimizer", {})
        if saved and len(saved["shards"]) != o.shards:
            tracker.say(f"the checkpoint has {len(saved['shards'])} shards, this run {o.shards}: "
                        "the weights carry over, the L-BFGS history starts afresh")
            saved = {}
        prefix = f"raydeep-lbfgs:{context.run_dir.name}:"
        self.shards = [ray.remote(LbfgsShard).options(name=f"{prefix}shard-{i}", num_cpus=0,
                                                      **place.at(-1)).remote(
                           i, part, o.history, saved["shards"][i] if saved else None)
                       for i, part in enumerate(self.layout.split(flat_parameters(self.model)))]
        data_ref = ray.put(data)
        initial_ref = ray.put({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        self.pool = None

        def start_worker(slot: int):
            restarts = self.pool.restarts if self.pool else 0
            return ray.remote(LbfgsWorker).options(
                name=f"{prefix}worker-{slot}" + (f"-r{restarts}" if restarts else ""),
                num_cpus=run.resources.cpus_per_worker, max_restarts=0,
                **place.at(slot),  # bundle per worker slot; a replacement takes its slot's
            ).remote(run, data_ref, initial_ref, self.shards, self.layout)

        try:
            self.pool = PortionPool(start_worker, run.resources.workers, o.backup_after,
                                    o.max_worker_restarts, tracker.say)
        except BaseException:
            self.close()
            raise
        self.lbfgs = DistributedLbfgs(ShardGroup(self.shards, self.layout), self.pool, o,
                                      o.portions_for(run), run.optim.weight_decay,
                                      LbfgsState(**saved["lbfgs"]) if saved else None)
        self.iterations: list[Iteration] = []
        self.first_step_at: float | None = None
        """Wall clock at the end of this start's first iteration (x's first update)."""
        self.first_step_s: float | None = None

    def train(self) -> FitResult:
        for epoch in range(self.start_epoch, self.run.optim.epochs):
            self.lbfgs.epoch(epoch, self._log_iteration)
            self._flush_iterations()
            if epoch == 0:
                self._log_start()
            self._assemble(epoch)
            metrics = {"train_loss": self.lbfgs.state.loss,
                       **mean_metrics(evaluate_sums(self.model, self.data.x_val, self.data.y_val), "val")}
            state = dataclasses.asdict(self.lbfgs.state)
            self.context.epoch_done(epoch, metrics, model=self.model.state_dict(),
                                    optimizer={"shards": self.lbfgs.shards.states(), "lbfgs": state})
            if self.context.should_stop:  # optim.early_stopping
                break
        if self.start_epoch >= self.run.optim.epochs:
            self._assemble(self.run.optim.epochs - 1)
        state = self.lbfgs.state
        summary = {"iterations": float(state.n_iter), "function_evaluations": float(state.func_evals),
                   "worker_restarts": float(self.pool.restarts),
                   "backup_portions": float(self.pool.backups),
                   "rerun_portions": float(self.pool.reruns),
                   "portions": float(self.lbfgs.portions)}
        if self.first_step_s is not None:
            summary["time_to_first_step_s"] = self.first_step_s
        weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return FitResult(weights, self.context.history, summary)

    def close(self) -> None:
        import ray

        if self.pool is not None:
            self.pool.close()
        for shard in self.shards:
            ray.kill(shard)

    def _log_iteration(self, it: Iteration) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self.iterations.append(it)

    def _log_start(self) -> None:
        """A fresh run's start-up marks, once its first epoch is over: the actors are asked
        when they were built only now, off the path to the first iteration."""
        import ray

        actors = [*self.shards, *self.pool.workers.values()]
        self.tracker.startup("actors_ready", at=max(ray.get([a.built.remote() for a in actors])))
        if self.first_step_at is not None:
            self.first_step_s = self.tracker.first_step(at=self.first_step_at)

    def _flush_iterations(self) -> None:
        """Per-iteration metrics, at step = iteration number, written once per epoch: an
        iteration takes milliseconds, a write to the tracking store about as long."""
        self.tracker.log_series([
            (it.number, {"loss": it.loss, "grad_norm": it.grad_norm, "step_size": it.step_size,
                         "line_search_evals": it.line_search_evals,
                         "samples_per_s": it.examples / max(it.seconds, 1e-9)})
            for it in self.iterations])
        self.iterations = []

    def _assemble(self, epoch: int) -> None:
        """The shards' x into the driver's model; batch norm's statistics from the workers."""
        load_parameters(self.model, self.lbfgs.shards.gather("x"))
        if not has_batch_norm(self.model):
            return
        evaluation = self.lbfgs.evaluations
        self.lbfgs.evaluations += 1
        self.lbfgs.shards.run([("copy", "trial", "x")])
        portions = self.lbfgs.portions
        answers = self.pool.run("statistics", evaluation, epoch, portions)
        examples = len(epoch_examples(len(self.data.y_train), self.options.batch_size,
                                      self.run.seed, epoch))
        total = None
        for (start, stop), stats in zip(portion_bounds(examples, portions), answers.values):
            part = torch.from_numpy(stats.copy()) * ((stop - start) / examples)
            total = part if total is None else total + part
        load_batch_norm_statistics(self.model, total)

"""The `pipeline` driver: starts the stage actors, asks them for one epoch at a time,
assembles the model, ends each epoch, and restarts every stage after a lost one."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipelines import figures
from pipelines.config import RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.errors import raise_task_cause
from pipelines.strategies.base import FitResult
from pipelines.strategies.pipeline_parallel.actions import V_SHAPE, holder, placement_of, stage_of
from pipelines.strategies.pipeline_parallel.cut import cut
from pipelines.strategies.pipeline_parallel.schedules import build
from pipelines.strategies.pipeline_parallel.simulation import expected_bubble
from pipelines.strategies.pipeline_parallel.stage import PipelineStage
from pipelines.training import placement
from pipelines.training import schedule as lr_schedule
from pipelines.training.loop import build_model, evaluate_sums, mean_metrics

if TYPE_CHECKING:
    from pipelines.strategies.pipeline_parallel.strategy import PipelineOptions


class PipelineRun:
    def __init__(self, run: RunConfig, data: Dataset, context: RunContext,
                 place: placement.Placement = placement.Placement()):
        self.run, self.data, self.context = run, data, context
        self.tracker = tracker = context.tracker
        self.run_dir = context.run_dir.local
        self.place = place  # one bundle per actor, in `self.actors` order
        self.options: PipelineOptions = run.strategy.options
        self.model = build_model(run, data)
        micro = run.data.batch_size // (self.options.microbatches * self.options.replicas)
        example = data.x_train[:micro] if data.stream is None else data.sample(micro)[0]  # streamed: held-out rows
        o = self.options
        self.cut = cut(self.model, run.model.name, o.stages * o.virtual_stages, example, o.split, o.virtual_stages)
        plan = build(o.schedule, o.stages, o.microbatches, o.virtual_stages)
        self.placement, self.expected_bubble = placement_of(plan), expected_bubble(plan, o.microbatches)
        self.shapes = self._shapes(example)
        """Per model stage (P x v with interleaving), the activation entering it."""
        self.restarts = 0
        self.actors: list = []
        self.timeline: dict[str, float] = {}
        """Wall-clock times of the latest start's marks (stages_ready, process_group)."""
        costs = ", ".join(f"{c * 1e3:.2f}" for c in self.cut.costs)
        held = (f"s and {2 * o.stages - 1}-s" if self.placement == V_SHAPE else f"s, s+{o.stages}, ...")
        chunks = f" x {o.virtual_stages} chunks (stage s holds chunks {held})" if o.virtual_stages > 1 else ""
        tracker.say(f"pipeline: {o.stages} stages{chunks} at layers {list(self.cut.bounds)}, "
                    f"measured forward+backward ms per micro-batch: {costs}")

    def _shapes(self, example: torch.Tensor) -> list[tuple[int, ...]]:
        layers = self.model.pipeline_layers()
        shapes, x = [], example
        with torch.no_grad():
            self.model.eval()
            for a, b in self.cut.bounds:
                shapes.append(tuple(x.shape[1:]))
                for layer in layers[a:b]:
                    x = layer(x)
        return shapes

    def _start(self, state: dict | None) -> None:
        import ray

        o, r = self.options, self.run.resources
        remote = ray.remote(PipelineStage)
        data = ray.put(self.data)
        prefix = f"raydeep-pipeline:{self.run_dir.name}:"
        layers = self.model.pipeline_layers()
        saved = state["optimizer"]["stages"] if state else []
        starts = []
        for s in range(o.stages):
            # Weights come from the driver's model (the checkpoint's, on a restart); optimizer
            # state only where the stage holds the same layers as when it was saved.
            bounds = self._bounds(s)
            same = s < len(saved) and _chunk_bounds(saved[s]["bounds"]) == bounds
            starts.append({"blocks": [nn.Sequential(*layers[a:b]).state_dict() for a, b in bounds],
                           "optimizer": saved[s]["optimizer"] if same else None})
        self.actors = [
            remote.options(name=f"{prefix}stage-{s}-replica-{k}-{self.restarts}", max_restarts=0,
                           num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                           **self.place.at(k * o.stages + s)).remote(
                s, k, self.run, data, self._bounds(s), self.shapes, starts[s])
            for k in range(o.replicas) for s in range(o.stages)]
        host, port = ray.get(self.actors[0].address.remote())
        ready = ray.get([a.join.remote(host, port) for a in self.actors])
        self.timeline = {"stages_ready": max(ready), "process_group": time.time()}

    def _bounds(self, stage: int) -> list[tuple[int, int]]:
        """The layers of each chunk actor `stage` holds (`actions.stage_of`)."""
        o = self.options
        return [self.cut.bounds[stage_of(stage, c, o.stages, self.placement)] for c in range(o.virtual_stages)]

    def _stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def train(self) -> FitResult:
        import ray

        state = self.context.resume_state()
        start = state["epoch"] + 1 if state else 0
        if state:
            self.model.load_state_dict(state["model"])
        first_step_s = None
        try:
            self._start(state)
            epoch = start
            while epoch < self.run.optim.epochs:
                began = time.perf_counter()
                try:
                    reports = ray.get([a.train_epoch.remote(epoch) for a in self.actors])
                except ray.exceptions.RayActorError as e:
                    epoch = self._restart(e)
                    continue
                except ray.exceptions.RayTaskError as e:
                    # A stage whose peer died fails its send or receive ("connection closed
                    # by peer") and may be the error ray.get sees first: a lost stage still.
                    lost = self._lost_stage()
                    if lost is None:
                        raise_task_cause(e)
                    epoch = self._restart(lost)
                    continue
                wall = time.perf_counter() - began
                if epoch == 0:
                    first_step_s = self._log_start(reports)
                states = ray.get([a.state.remote() for a in self.actors[:self.options.stages]])
                self._assemble(states)
                metrics = {**self._metrics(reports, wall), "lr": states[0]["optimizer"]["param_groups"][0]["lr"]}
                if self.run.optim.schedule == "plateau":
                    # every stage (replicas too) judges the same metrics, and the states about
                    # to be checkpointed take the same judgement
                    for actor in self.actors:
                        actor.observe.remote(metrics)
                    for saved in states:
                        lr_schedule.observe(saved["optimizer"]["param_groups"], self.run.optim, metrics)
                self.context.epoch_done(epoch, metrics, model=self.model.state_dict(),
                                        optimizer={"stages": states})
                if epoch == self.run.optim.epochs - 1 or self.context.should_stop:
                    self._log_timeline(reports)
                    if self.context.should_stop:  # optim.early_stopping
                        break
                epoch += 1
        finally:
            self._stop()
        summary = {"stage_restarts": float(self.restarts)}  # bubble_theoretical is logged per epoch
        if first_step_s is not None:
            summary["time_to_first_step_s"] = first_step_s
        return FitResult({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                         self.context.history, summary)

    def _lost_stage(self) -> Exception | None:
        """The death of a stage actor, if one died; None when they are all alive."""
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.address.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                return e
        return None

    def _restart(self, error: Exception) -> int:
        o = self.options
        if 0 <= o.max_failures <= self.restarts:
            raise RuntimeError(f"a pipeline stage died after {self.restarts} restarts "
                               f"(strategy.max_failures={o.max_failures}): {error}")
        self.restarts += 1
        self._stop()
        state = self.context.newest_state()
        epoch = state["epoch"] + 1 if state else 0
        if state:
            self.model.load_state_dict(state["model"])
        else:
            self.model = build_model(self.run, self.data)
        self.tracker.say(f"a pipeline stage died; restarting every stage from epoch {epoch + 1}")
        self.tracker.log_metrics({"stage_restarts": self.restarts}, step=self.restarts)
        self._start(state)
        return epoch

    def _log_start(self, reports: list[dict]) -> float | None:
        """A fresh run's start-up marks, once its first epoch is over; returns the time to
        its first step: when the last stage to step had stepped."""
        self.tracker.log_startup({name: self.tracker.since_launch(at)
                                  for name, at in self.timeline.items()})
        return self.tracker.first_step(at=max(r["first_step_at"] for r in reports))

    def _assemble(self, states: list[dict]) -> None:
        """Load replica 0's stages into the driver's whole model."""
        layers = self.model.pipeline_layers()
        for state in states:
            for (a, b), block in zip(_chunk_bounds(state["bounds"]), state["blocks"]):
                nn.Sequential(*layers[a:b]).load_state_dict(block)

    def _metrics(self, reports: list[dict], wall: float) -> dict:
        o = self.options
        v = o.virtual_stages
        loss_actor = holder(o.stages * v - 1, o.stages, self.placement)[0]  # the model's last stage
        last = [r for r in reports if r["stage"] == loss_actor]
        steps = sum(r["steps"] for r in last)
        metrics = {"train_loss": sum(r["loss_sum"] for r in last) / max(steps, 1),
                   "samples_per_s": sum(r["samples"] for r in last) / wall,
                   "bubble_theoretical": self.expected_bubble}
        for stage in range(o.stages):
            mine = [r for r in reports if r["stage"] == stage]
            metrics[f"bubble_stage{stage}"] = sum(1 - r["busy"] / r["wall"] for r in mine) / len(mine)
            metrics[f"peak_activation_mb_stage{stage}"] = max(r["peak_activation_bytes"] for r in mine) / 2**20
        sums = evaluate_sums(self.model, self.data.x_val, self.data.y_val)
        metrics.update(mean_metrics(sums, "val"))
        return metrics

    def _log_timeline(self, reports: list[dict]) -> None:
        rows = {r["stage"]: r["timeline"] for r in reports if r["replica"] == 0}
        if all(rows.values()) and self.run.tracking.figures:
            figure = figures.pipeline_timeline([rows[s] for s in sorted(rows)])
            self.tracker.log_figure(figure, "pipeline_timeline.png")
            figures.close(figure)


def _chunk_bounds(saved) -> list[tuple[int, int]]:
    """A stage's saved bounds as a list of chunks' (a checkpoint of before interleaving
    saved one pair)."""
    if len(saved) == 2 and all(isinstance(v, int) for v in saved):
        return [tuple(saved)]
    return [tuple(b) for b in saved]

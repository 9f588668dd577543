"""The `diloco` driver: holds the global parameters and the outer optimizer, runs the
rounds, averages the workers' pseudo-gradients in rank order, replaces the dead.

A round is H inner steps on every worker, then one synchronisation: the driver averages
the pseudo-gradients of the workers that answered (a worker lost mid-round is left out of
that round, and replaced or not as `on_worker_failure` says), hands the mean to the outer
optimizer as the gradient of the global parameters, and sends the result out with the next
round. Rounds never span two epochs: every epoch ends synchronised, validated on the
driver and checkpointed, its S steps cut into ceil(S / H) rounds of equal length (within
one step): a short last round would take a full outer step, momentum and all, for a
fraction of the work (measured: H = 16 over 20 steps an epoch, rounds of 16 and 4 left an
MLP 4 points lower than rounds of 10 and 10, one run each). An H longer than an epoch means
one synchronisation per epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.config import RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.errors import first_line, raise_task_cause
from pipelines.strategies.base import FitResult
from pipelines.strategies.diloco.worker import DiLoCoWorker
from pipelines.training import placement
from pipelines.training.epochs import driver_model
from pipelines.training.flat import flat_buffers, flat_parameters, from_wire, load_buffers, load_parameters
from pipelines.training.loop import evaluate_sums, mean_metrics, steps_per_epoch

if TYPE_CHECKING:
    from pipelines.strategies.diloco.strategy import DiLoCoOptions


def rounds(steps: int, sync_every: int) -> list[tuple[int, int]]:
    """An epoch's steps [0, steps) cut into ceil(steps / sync_every) rounds of equal
    length within one step, as (start, stop)."""
    count = -(-steps // sync_every)
    edges = [round(i * steps / count) for i in range(count + 1)] if count else [0]
    return list(zip(edges[:-1], edges[1:]))


class DiLoCo:
    def __init__(self, run: RunConfig, data: Dataset, context: RunContext,
                 place: placement.Placement = placement.Placement()):
        import ray

        self.run, self.data, self.context, self.tracker = run, data, context, context.tracker
        self.options: DiLoCoOptions = run.strategy.options
        self.place = place
        self.model, state = driver_model(run, data, context)
        self.start_epoch = state["epoch"] + 1 if state else 0
        o = self.options
        self.theta = torch.nn.Parameter(flat_parameters(self.model).clone())
        self.outer = torch.optim.SGD([self.theta], lr=o.outer_lr, momentum=o.outer_momentum,
                                     nesterov=o.nesterov and o.outer_momentum > 0)
        if state and state["optimizer"].get("outer"):
            self.outer.load_state_dict(state["optimizer"]["outer"])
        self.buffers = flat_buffers(self.model).numpy() if flat_buffers(self.model).numel() else None
        self.data_ref = ray.put(data)
        self.workers: dict[int, object] = {}
        self.restarts = 0
        self.first_step_s: float | None = None
        self.bytes_sent = 0
        self.steps_total = 0

    def _start_worker(self, rank: int):
        import ray

        r = self.run.resources
        device = "cuda" if r.gpus_per_worker > 0 else "cpu"
        name = f"raydeep-diloco:{self.context.run_dir.local.name}:worker-{rank}" + (
            f"-r{self.restarts}" if self.restarts else "")
        self.workers[rank] = ray.remote(DiLoCoWorker).options(
            num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, max_restarts=0, name=name,
            **self.place.at(rank)).remote(rank, r.workers, self.run, self.data_ref, device)

    def train(self) -> FitResult:
        import ray

        try:
            for rank in range(self.run.resources.workers):
                self._start_worker(rank)
            steps = steps_per_epoch(len(self.data.y_train), self.run.data.batch_size, self.run.optim.steps_per_epoch)
            for epoch in range(self.start_epoch, self.run.optim.epochs):
                self._epoch(epoch, steps)
                if self.context.should_stop:  # optim.early_stopping
                    break
        finally:
            for actor in self.workers.values():
                ray.kill(actor)
        summary = {"worker_restarts": float(self.restarts), "bytes_sent_per_worker_total": float(self.bytes_sent),
                   **self._allreduce_comparison()}
        if self.first_step_s is not None:
            summary["time_to_first_step_s"] = self.first_step_s
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return FitResult(state, self.context.history, summary)

    def _epoch(self, epoch: int, steps: int) -> None:
        loss_sum, step_count, samples, syncs, sent = 0.0, 0, 0, 0, 0
        began = ended = None
        for start, stop in rounds(steps, self.options.sync_every):
            answers = self._round(epoch, start, stop)
            if self.first_step_s is None and epoch == 0 and start == 0:
                self.tracker.startup("actors_ready", at=max(a["began"] for a in answers))
                self.first_step_s = self.tracker.first_step(at=min(a["ended"] for a in answers))
            began = min([a["began"] for a in answers] + ([began] if began else []))
            ended = max(a["ended"] for a in answers)
            loss_sum += sum(a["loss_sum"] for a in answers)
            step_count += sum(a["steps"] for a in answers)
            samples += sum(a["samples"] for a in answers)
            sent += answers[0]["delta"].nbytes
            syncs += 1
        self.bytes_sent += sent
        self.steps_total += steps
        load_parameters(self.model, self.theta.detach())
        if self.buffers is not None:
            load_buffers(self.model, torch.from_numpy(self.buffers))
        sums = evaluate_sums(self.model, self.data.x_val, self.data.y_val)
        metrics = {"train_loss": loss_sum / max(step_count, 1), "samples_per_s": samples / max(ended - began, 1e-9),
                   "syncs": float(syncs), "bytes_sent_per_worker": float(sent), **mean_metrics(sums, "val")}
        self.context.epoch_done(epoch, metrics, model=self.model.state_dict(),
                                optimizer={"outer": self.outer.state_dict()})

    def _round(self, epoch: int, start: int, stop: int) -> list[dict]:
        """One round on every live worker, then the outer step; the answers that arrived."""
        import ray

        theta = ray.put(self.theta.detach().numpy().copy())
        calls = {rank: w.round.remote(theta, self.buffers, epoch, start, stop) for rank, w in self.workers.items()}
        answers: dict[int, dict] = {}
        for rank in sorted(calls):
            try:
                answers[rank] = ray.get(calls[rank])
            except ray.exceptions.RayActorError as e:
                self._lost(rank, e)
            except ray.exceptions.RayTaskError as e:
                raise_task_cause(e)
        if not answers:
            raise RuntimeError(f"every diloco worker died in epoch {epoch + 1}")
        # Rank order, float64: the same mean whichever worker answered first.
        total = None
        for rank in sorted(answers):
            delta = from_wire(answers[rank]["delta"]).double()
            total = delta if total is None else total + delta
        self.theta.grad = (total / len(answers)).float()
        self.outer.step()
        last = answers[max(answers)]
        if last["buffers"] is not None:  # running statistics: the highest rank's, as ps keeps the last push's
            self.buffers = np.asarray(last["buffers"])
        return [answers[r] for r in sorted(answers)]

    def _lost(self, rank: int, error: Exception) -> None:
        o = self.options
        reason = first_line(error, 200)
        del self.workers[rank]
        if o.on_worker_failure == "continue":
            self.tracker.say(f"worker {rank} died ({reason}); its round is left out, the others go on")
            return
        if 0 <= o.max_worker_restarts <= self.restarts:
            raise RuntimeError(f"worker {rank} died after {self.restarts} replacements "
                               f"(strategy.max_worker_restarts={o.max_worker_restarts}): {reason}")
        self.restarts += 1
        self.tracker.say(f"worker {rank} died ({reason}); its round is left out and a new worker "
                         "joins the next one")
        self.tracker.log_metrics({"worker_restarts": self.restarts}, step=self.restarts)
        self._start_worker(rank)

    def _allreduce_comparison(self) -> dict[str, float]:
        allreduce = ring_allreduce_bytes(self.steps_total, self.run.resources.workers, self.theta.numel())
        figures = {"allreduce_bytes_per_worker_total": float(allreduce)}
        if self.bytes_sent:
            figures["bytes_saved_vs_allreduce"] = float(allreduce / self.bytes_sent)
        return figures


def ring_allreduce_bytes(steps: int, workers: int, numel: int) -> float:
    """What a ring allreduce of float32 gradients in every step sends per worker for
    `steps` steps: 2 (W - 1) / W of the gradient per step."""
    return steps * 2 * (workers - 1) / workers * numel * 4

"""The `diloco` driver: holds the global parameters and the outer optimizer, runs the
rounds, averages the workers' pseudo-gradients in rank order, replaces the dead.

A round is H inner steps on every worker, then one synchronisation: the driver averages
the pseudo-gradients of the workers that answered (a worker lost mid-round is left out of
that round, and replaced or not as `on_worker_failure` says), hands the mean to the outer
optimizer as the gradient of the global parameters, and sends the result out with the next
round. Which steps a round takes is `plan`'s: an epoch that ends with a synchronisation is
validated on the driver and checkpointed; one that ends inside a round (H longer than an
epoch) is logged with its training figures only.
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
from pipelines.strategies.diloco.plan import run_rounds
from pipelines.strategies.diloco.worker import DiLoCoWorker
from pipelines.training import placement
from pipelines.training.epochs import driver_model
from pipelines.training.flat import flat_buffers, flat_parameters, from_wire, load_buffers, load_parameters
from pipelines.training.loop import evaluate_sums, mean_metrics, steps_per_epoch

if TYPE_CHECKING:
    from pipelines.strategies.diloco.strategy import DiLoCoOptions


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
        self.link_wait_s: dict[int, float] = {}
        """Each rank's seconds waited on `resources.link_mbps` (its newest answer's)."""
        self.epoch_tally: dict[int, dict] = {}
        """The open epochs' figures, summed over rounds and workers until each ends."""

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
            steps = steps_per_epoch(self.data.train_rows, self.run.data.batch_size, self.run.optim.steps_per_epoch)
            for segments in run_rounds(self.run.optim.epochs, steps, self.options.sync_every, self.start_epoch):
                self._round(segments, steps)
                if self.context.should_stop:  # optim.early_stopping
                    break
        finally:
            for actor in self.workers.values():
                ray.kill(actor)
        summary = {"worker_restarts": float(self.restarts), "bytes_sent_per_worker_total": float(self.bytes_sent),
                   **self._allreduce_comparison()}
        if self.run.resources.link_mbps > 0 and self.link_wait_s:
            summary["link_wait_s_per_worker"] = max(self.link_wait_s.values())
        if self.first_step_s is not None:
            summary["time_to_first_step_s"] = self.first_step_s
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return FitResult(state, self.context.history, summary)

    def _round(self, segments: list[tuple[int, int, int]], steps: int) -> None:
        """One round on every live worker, the outer step, and the epochs it ended."""
        answers = self._exchange(segments)
        if self.first_step_s is None:
            self.tracker.startup("actors_ready", at=max(a["began"] for a in answers))
            self.first_step_s = self.tracker.first_step(at=min(a["first_step_at"] for a in answers))
        began = min(a["began"] for a in answers)
        for i, (epoch, start, stop) in enumerate(segments):
            figures = [a["segments"][i] for a in answers]
            ended = max(f["ended"] for f in figures)
            tally = self.epoch_tally.setdefault(epoch, {"loss_sum": 0.0, "steps": 0, "samples": 0, "began": began,
                                                        "syncs": 0, "sent": 0, "global_steps": 0})
            tally["global_steps"] += stop - start
            tally["loss_sum"] += sum(f["loss_sum"] for f in figures)
            tally["steps"] += sum(f["steps"] for f in figures)
            tally["samples"] += sum(f["samples"] for f in figures)
            tally["ended"] = ended
            synced = i == len(segments) - 1
            if synced:
                tally["syncs"] += 1
                tally["sent"] += answers[0]["delta"].nbytes
            if stop == steps:
                self._epoch_ended(epoch, self.epoch_tally.pop(epoch), synced)
            began = ended

    def _epoch_ended(self, epoch: int, tally: dict, synced: bool) -> None:
        self.bytes_sent += tally["sent"]
        self.steps_total += tally["global_steps"]
        metrics = {"train_loss": tally["loss_sum"] / max(tally["steps"], 1),
                   "samples_per_s": tally["samples"] / max(tally["ended"] - tally["began"], 1e-9),
                   "syncs": float(tally["syncs"]), "bytes_sent_per_worker": float(tally["sent"])}
        if not synced:  # inside a round that spans epochs: no global model to validate here
            self.context.epoch_logged(epoch, metrics)
            return
        load_parameters(self.model, self.theta.detach())
        if self.buffers is not None:
            load_buffers(self.model, torch.from_numpy(self.buffers))
        metrics.update(mean_metrics(evaluate_sums(self.model, self.data.x_val, self.data.y_val), "val"))
        self.context.epoch_done(epoch, metrics, model=self.model.state_dict(),
                                optimizer={"outer": self.outer.state_dict()})

    def _exchange(self, segments: list[tuple[int, int, int]]) -> list[dict]:
        """The round on every live worker, then the outer step; the answers that arrived."""
        import ray

        theta = ray.put(self.theta.detach().numpy().copy())
        calls = {rank: w.round.remote(theta, self.buffers, segments) for rank, w in self.workers.items()}
        answers: dict[int, dict] = {}
        for rank in sorted(calls):
            try:
                answers[rank] = ray.get(calls[rank])
            except ray.exceptions.RayActorError as e:
                self._lost(rank, e)
            except ray.exceptions.RayTaskError as e:
                raise_task_cause(e)
        if not answers:
            raise RuntimeError(f"every diloco worker died in epoch {segments[0][0] + 1}")
        # Rank order, float64: the same mean whichever worker answered first.
        total = None
        for rank in sorted(answers):
            delta = from_wire(answers[rank]["delta"]).double()
            total = delta if total is None else total + delta
        self.theta.grad = (total / len(answers)).float()
        self.outer.step()
        for rank, answer in answers.items():
            self.link_wait_s[rank] = answer["link_wait_s"]
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

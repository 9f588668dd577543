"""The `ps` driver (Downpour): starts the shards, the coordinator and the workers, watches
them, replaces the dead, and ends each epoch from the shards' current parameters."""
from __future__ import annotations

import shutil
from collections import Counter
from typing import TYPE_CHECKING

import torch

from pipelines import figures
from pipelines.config import RunConfig
from pipelines.context import RunContext
from pipelines.data import Dataset
from pipelines.errors import first_line, raise_task_cause
from pipelines.strategies.base import FitResult
from pipelines.strategies.ps import progress
from pipelines.strategies.ps.coordinator import Coordinator
from pipelines.strategies.ps.shard import ParameterShard, write_initial_state
from pipelines.strategies.ps.worker import PSWorker
from pipelines.training import placement
from pipelines.training.epochs import driver_model
from pipelines.training.flat import ShardLayout, load_buffers, load_parameters
from pipelines.training.loop import evaluate_sums, mean_metrics, run_steps_per_epoch

if TYPE_CHECKING:
    from pipelines.strategies.ps.strategy import ParameterServerOptions


class Downpour:
    """One `ps` run's actors and the driver loop that watches them."""

    POLL_S = 0.25

    def __init__(self, run: RunConfig, data: Dataset, context: RunContext,
                 place: placement.Placement = placement.Placement()):
        import ray

        self.run, self.data, self.context, self.tracker = run, data, context, context.tracker
        self.run_dir = context.run_dir.local
        self.place = place  # bundles: workers by rank, then shards
        self.options: ParameterServerOptions = run.strategy.options
        self.model, state = driver_model(run, data, context)
        self.start_epoch = state["epoch"] + 1 if state else 0
        self.layout = ShardLayout.of(self.model, self.options.shards)
        self.snapshot_dir = self.run_dir / "ps_snapshots"
        # A resumed run carries on from its shards' snapshots and its workers' positions
        # where they are newer than the checkpoint (`progress`); a new run starts clean.
        self.resumed = progress.load(self.snapshot_dir, self.start_epoch) if state else None
        if self.resumed is None:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)
        self.shards = self._start_shards(state)
        self.coordinator = ray.remote(Coordinator).options(num_cpus=0, max_concurrency=1000,
                                                           **place.at(-1)).remote(
            run.resources.workers, self.options.staleness, self.resumed)
        self.data_ref = ray.put(data)
        self.initial_ref = ray.put({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        self.workers: dict[int, object] = {}
        self.worker_restarts = 0
        self.shard_seen = [{"incarnation": 0, "version": 0} for _ in self.shards]
        self.shard_restarts = 0
        self.histogram: Counter[int] = Counter()
        self.first_step_s: float | None = None
        self.link_wait_s: dict[int, float] = {}
        """Per worker rank, the seconds its pushes waited on `--link-mbps` in the epochs logged."""

    # --- actors ----------------------------------------------------------------------------

    def _start_shards(self, state: dict | None) -> list:
        import ray

        from pipelines.training.flat import flat_buffers, flat_parameters

        o = self.options
        flat, buffers = flat_parameters(self.model), flat_buffers(self.model)
        saved = state["optimizer"]["shards"] if state else [None] * o.shards
        if len(saved) != o.shards:
            self.tracker.say(f"the checkpoint has {len(saved)} shards, this run {o.shards}: "
                             "the weights carry over, the optimizer state starts afresh")
            saved = [None] * o.shards
        fresher = {}
        for i, part in enumerate(self.layout.split(flat)):
            version = progress.fresher_snapshot(self.snapshot_dir, i, saved[i]) if self.resumed else None
            if version is None:
                write_initial_state(self.snapshot_dir, i, part, buffers if i == 0 and len(buffers) else None,
                                    saved[i])
            else:
                fresher[i] = version
        if fresher:
            behind = {i: (saved[i] or {}).get("version", 0) for i in fresher}
            self.tracker.say("resumed shard(s) " + ", ".join(
                f"{i} at version {v} ({v - behind[i]} updates past the checkpoint)" for i, v in fresher.items())
                + " from their snapshots")
        remote = ray.remote(ParameterShard)
        return [remote.options(
                    name=f"{self._prefix()}shard-{i}", num_cpus=o.shard_cpus,
                    num_gpus=o.shard_gpus if o.device == "cuda" else 0,
                    max_restarts=-1, max_task_retries=-1,
                    **self.place.at(self.run.resources.workers + i)).remote(
                    i, self.run.optim, o.device, str(self.snapshot_dir), o.snapshot_every,
                    o.staleness_aware_lr, self.run.resources.workers * run_steps_per_epoch(self.run, self.data))
                for i in range(o.shards)]

    def _start_worker(self, rank: int, epoch: int, step: int, clock: int):
        import ray

        r = self.run.resources
        device = "cuda" if r.gpus_per_worker > 0 else "cpu"
        name = f"{self._prefix()}worker-{rank}" + (f"-r{self.worker_restarts}" if self.worker_restarts else "")
        actor = ray.remote(PSWorker).options(
            num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, max_restarts=0, name=name,
            **self.place.at(rank)).remote(rank, r.workers, self.run, self.data_ref, self.initial_ref, self.shards,
                 self.coordinator, self.layout, device)
        self.workers[rank] = actor
        return actor.run.remote(epoch, step, clock)

    def _start_position(self, rank: int) -> tuple[int, int, int]:
        """(epoch, step, clock) worker `rank` starts from: where a resumed run's worker was."""
        if self.resumed and rank in self.resumed["positions"]:
            epoch, step = self.resumed["positions"][rank]
            if (epoch, step) != (self.start_epoch, 0):
                self.tracker.say(f"worker {rank} resumes its data at epoch {epoch + 1} step {step}")
            return epoch, step, self.resumed["clocks"].get(rank, 0)
        return self.start_epoch, 0, 0

    def _prefix(self) -> str:
        return f"raydeep-ps:{self.run_dir.name}:"

    # --- the driver loop -------------------------------------------------------------------

    def train(self) -> FitResult:
        import ray

        try:
            running = {self._start_worker(rank, *self._start_position(rank)): rank
                       for rank in range(self.run.resources.workers)}
            expected = set(running.values())
            next_epoch = self.start_epoch
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=self.POLL_S)
                for ref in done:
                    rank = running.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        replacement = self._worker_died(rank, e)
                        if replacement is None:
                            expected.discard(rank)
                        else:
                            running[replacement] = rank
                    except ray.exceptions.RayTaskError as e:
                        raise_task_cause(e)
                self._watch_shards()
                next_epoch = self._log_epochs(next_epoch, expected)
            self._watch_shards()
            self._log_epochs(next_epoch, expected)
            return self._result()
        finally:
            for actor in [*self.workers.values(), *self.shards, self.coordinator]:
                ray.kill(actor)

    def _worker_died(self, rank: int, error: Exception):
        import ray

        o = self.options
        reason = first_line(error, 200)
        if o.on_worker_failure == "continue":
            ray.get(self.coordinator.retire.remote(rank))
            self.tracker.say(f"worker {rank} died ({reason}); going on with the other workers")
            if not any(True for r in self.workers if r != rank):
                raise RuntimeError("every parameter-server worker died")
            del self.workers[rank]
            return None
        if 0 <= o.max_worker_restarts <= self.worker_restarts:
            raise RuntimeError(f"worker {rank} died after {self.worker_restarts} replacements "
                               f"(strategy.max_worker_restarts={o.max_worker_restarts}): {reason}")
        self.worker_restarts += 1
        position = ray.get(self.coordinator.position.remote(rank))
        epoch, step, clock = position if position else (self.start_epoch, 0, 0)
        self.tracker.say(f"worker {rank} died ({reason}); a new worker resumes its data at "
                         f"epoch {epoch + 1} step {step}")
        self.tracker.log_metrics({"worker_restarts": self.worker_restarts},
                                 step=self.worker_restarts)
        return self._start_worker(rank, epoch, step, clock)

    def _watch_shards(self) -> None:
        import ray

        stats = ray.get([s.stats.remote(()) for s in self.shards])
        for index, (seen, now) in enumerate(zip(self.shard_seen, stats)):
            if now["incarnation"] > seen["incarnation"]:
                self.shard_restarts += now["incarnation"] - seen["incarnation"]
                lost = max(seen["version"] - (now["restored_version"] or 0), 0)
                self.tracker.say(f"shard {index} restarted from its snapshot at version "
                                 f"{now['restored_version']} ({lost} updates lost)")
                self.tracker.log_metrics({"shard_restarts": self.shard_restarts},
                                         step=self.shard_restarts)
            self.shard_seen[index] = now

    def _log_epochs(self, next_epoch: int, expected: set[int]) -> int:
        """Log (and checkpoint) every epoch that all expected workers have finished."""
        import ray

        report = ray.get(self.coordinator.report.remote(next_epoch))
        progress.save(self.snapshot_dir, report)
        while next_epoch < self.run.optim.epochs:
            done = report["epochs"].get(next_epoch, {})
            if not expected or not expected <= set(done):
                break
            if next_epoch == 0:
                self._log_start(list(done.values()), report["first_step_at"])
            self._log_epoch(next_epoch, list(done.values()))
            for rank, stats in done.items():
                self.link_wait_s[rank] = self.link_wait_s.get(rank, 0.0) + stats.get("link_wait_s", 0.0)
            next_epoch += 1
        return next_epoch

    def _log_start(self, reports: list[dict], first_step_at: float | None) -> None:
        """A fresh run's start-up marks, once its first epoch is over: each worker begins its
        first epoch once its replica is built and the shards answered its first pull."""
        self.tracker.startup("actors_ready", at=max(r["began"] for r in reports))
        if first_step_at:  # the coordinator heard of the first push
            self.first_step_s = self.tracker.first_step(at=first_step_at)

    def _log_epoch(self, epoch: int, reports: list[dict]) -> None:
        import ray

        stats = ray.get([s.stats.remote([epoch]) for s in self.shards])
        new = Counter()  # staleness of the updates computed in this epoch, over all shards
        for shard in stats:
            new.update(shard["histograms"].get(epoch, {}))
        self._assemble()
        wall = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
        steps = sum(r["steps"] for r in reports)
        sums = evaluate_sums(self.model, self.data.x_val, self.data.y_val)
        metrics = {"train_loss": sum(r["loss_sum"] for r in reports) / max(steps, 1),
                   "samples_per_s": sum(r["samples"] for r in reports) / max(wall, 1e-9),
                   "updates_per_s": steps / max(self.options.n_push, 1) / max(wall, 1e-9),
                   **mean_metrics(sums, "val"), **_staleness_metrics(new)}
        states = ray.get([s.state.remote() for s in self.shards])
        self.context.epoch_done(epoch, metrics, model=self.model.state_dict(), optimizer={"shards": states})

    def _assemble(self) -> None:
        """Load the shards' current parameters (and buffers) into the driver's model."""
        import ray

        pulled = ray.get([s.pull.remote() for s in self.shards])
        load_parameters(self.model, torch.cat([torch.from_numpy(p.copy()) for _, p, _ in pulled]))
        if pulled[0][2] is not None:
            load_buffers(self.model, torch.from_numpy(pulled[0][2].copy()))

    def _result(self) -> FitResult:
        import ray

        self._assemble()
        report = ray.get(self.coordinator.report.remote(self.run.optim.epochs))
        for shard in ray.get([s.stats.remote() for s in self.shards]):
            for counts in shard["histograms"].values():
                self.histogram.update(counts)
        overall = _staleness_metrics(self.histogram)
        summary = {"worker_restarts": float(self.worker_restarts),
                   "shard_restarts": float(self.shard_restarts),
                   "updates": float(sum(self.histogram.values()) / len(self.shards)),
                   **{f"{k}_overall": float(v) for k, v in overall.items()}}
        if report["gaps"]:
            summary["max_clock_gap"] = float(max(report["gaps"]))
        if self.first_step_s is not None:
            summary["time_to_first_step_s"] = self.first_step_s
        if self.run.resources.link_mbps > 0 and self.link_wait_s:
            summary["link_wait_s_per_worker"] = max(self.link_wait_s.values())
        if self.histogram and self.run.tracking.figures:
            figure = figures.staleness_histogram(dict(self.histogram))
            self.tracker.log_figure(figure, "staleness_histogram.png")
            figures.close(figure)
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return FitResult(state, self.context.history, summary)


def _staleness_metrics(histogram: Counter) -> dict[str, float]:
    count = sum(histogram.values())
    if not count:
        return {}
    return {"staleness_mean": sum(k * v for k, v in histogram.items()) / count,
            "staleness_max": float(max(histogram))}

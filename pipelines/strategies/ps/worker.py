"""A Downpour worker: a model replica on its own data shard, on its own clock.

Every `n_fetch` steps it takes fresh parameters from the shards, every `n_push` steps it
sends the gradients it accrued since its last push (one contiguous slice per shard), and
in between it applies its own gradients locally, as in DistBelief's Algorithm 1. It talks
to the shards directly and waits for no other worker, except when a staleness bound makes
the coordinator hold it back.

Fully asynchronous runs fuse each push with the next pull (`exchange`, one round trip per
shard) and, with `overlap`, compute the next gradient while that round trip is in flight.
Under a staleness bound a worker pulls only after the coordinator let it through, so the
parameters it computes on hold every update the bound promises.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from pipelines.config import RunConfig
from pipelines.data import Dataset
from pipelines.errors import quiet_numpy_views
from pipelines.training.flat import (
    ShardLayout,
    flat_buffers,
    flat_gradients,
    load_buffers,
    load_parameters,
    to_wire,
    trainable,
)
from pipelines.training.link import Link
from pipelines.training.loop import InMemory, build_model
from pipelines.training.precision import autocast

_MAX_IN_FLIGHT = 4
_POSITION_EVERY_S = 0.05
"""Fully asynchronous workers tell the coordinator their position this often, not per push:
an actor call costs about 0.5 ms of CPU here, and a replacement redoes at most this much."""

quiet_numpy_views()


class PSWorker:
    def __init__(self, rank: int, world: int, run: RunConfig, data: Dataset, initial: dict,
                 shards: list, coordinator, layout: ShardLayout, device: str):
        self.rank, self.world, self.run_config = rank, world, run
        self.options = run.strategy.options
        self.link = Link(run.resources.link_mbps)
        self.device = torch.device(device)
        self.model = build_model(run, data).to(self.device)
        self.model.load_state_dict(initial)
        if data.stream is None:
            self.rows = InMemory(data.x_train.to(self.device), data.y_train.to(self.device))
        else:
            from pipelines.streaming import Streamed

            self.rows = Streamed(table=data.stream, part=(rank, world))
        self.shards, self.coordinator, self.layout = shards, coordinator, layout
        self.has_buffers = layout.buffer_numel > 0
        self.versions = [0] * layout.shards
        self.reported_at = 0.0
        self.pending: list[tuple[str, list]] = []
        """In-flight ("push" | "exchange", refs per shard), oldest first."""

    def run(self, epoch: int, step: int, clock: int) -> int:
        """Train from (epoch, step) to the end; returns the number of pushes made."""
        import ray

        run, opts = self.run_config, self.options
        torch.manual_seed(run.seed * 1009 + self.rank + epoch)  # dropout differs per worker
        self._install(ray.get([s.pull.remote() for s in self.shards]))
        accrued, local_steps = None, 0
        for e in range(epoch, run.optim.epochs):
            skip = step if e == epoch else 0
            began, steps, samples, waited = time.time(), 0, 0, self.link.waited_s
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for s, batch in enumerate(self._batches(e)):
                if s < skip:  # a replacement resumes the dead worker's data where it was
                    continue
                if local_steps and local_steps % opts.n_fetch == 0:
                    self._refresh()
                loss, gradient = self._gradient(batch)
                accrued = gradient if accrued is None else accrued.add_(gradient)
                local_steps += 1
                fetch_next = local_steps % opts.n_fetch == 0
                if local_steps % opts.n_push == 0:
                    clock += 1
                    self._push(accrued, fetch_next, clock, e, s + 1)
                    accrued = None
                if not fetch_next:  # the next step reuses these weights: move them locally
                    with torch.no_grad():
                        for p in trainable(self.model):
                            if p.grad is not None:
                                p.sub_(p.grad, alpha=run.optim.lr)
                loss_sum += loss.detach()  # read once per epoch: no sync per step
                steps += 1
                samples += len(batch[1])
            mean = loss_sum.item() / max(steps, 1)
            if not math.isfinite(mean):
                raise FloatingPointError(f"training loss became {mean} on worker {self.rank} in "
                                         f"epoch {e + 1}; lower optim.lr or set optim.grad_clip")
            if e == run.optim.epochs - 1:  # the last epoch's checkpoint must hold every update
                if accrued is not None:
                    clock += 1
                    self._push(accrued, False, clock, run.optim.epochs, 0)
                for _, refs in self.pending:
                    ray.get(refs)
                self.pending = []
            self.coordinator.epoch_done.remote(self.rank, e, {
                "loss_sum": loss_sum.item(), "steps": steps, "samples": samples,
                "began": began, "ended": time.time(), "link_wait_s": self.link.waited_s - waited})
        ray.get(self.coordinator.retire.remote(self.rank))
        return clock

    def _batches(self, epoch: int):
        """This worker's batches of `epoch`: its 1/W of each global batch in memory, or
        global-batch/W rows at a time from its own part of a streamed table."""
        run = self.run_config
        return self.rows.epoch(run.data.batch_size, seed=run.seed, epoch=epoch, rank=self.rank,
                               world=self.world, cap=run.optim.steps_per_epoch, device=self.device)

    def _gradient(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with autocast(self.run_config.optim.precision, self.device):  # bf16: the forward's products
            loss = self.model.loss(batch)
        loss.backward()
        if self.run_config.optim.grad_clip:  # as the shared loop clips, before the local step too
            torch.nn.utils.clip_grad_norm_(trainable(self.model), self.run_config.optim.grad_clip)
        gradient = flat_gradients(self.model)
        return loss, gradient

    def _push(self, accrued: torch.Tensor, fetch_next: bool, clock: int, epoch: int,
              next_step: int) -> None:
        import ray

        if self.world > 1:  # W pushes of 1/W of a global batch each move the weights as one step
            accrued = accrued.div_(self.world)
        slices = [to_wire(part, self.options.push_dtype) for part in self.layout.split(accrued)]
        self.link.send(sum(part.nbytes for part in slices))
        buffers = flat_buffers(self.model).cpu().numpy() if self.has_buffers else None
        bounded = self.options.staleness is not None
        fuse = fetch_next and not bounded
        computed_in = min(epoch, self.run_config.optim.epochs - 1)
        calls = [(shard.exchange if fuse else shard.push).remote(
                    part, self.versions[index], buffers if index == 0 else None, computed_in)
                 for index, (shard, part) in enumerate(zip(self.shards, slices))]
        if bounded:
            ray.get(calls)  # applied before the coordinator hears of it: clocks never run ahead
            ray.get(self.coordinator.advance.remote(self.rank, clock, epoch, next_step))
            return
        self.pending.append(("exchange" if fuse else "push", calls))
        if time.monotonic() - self.reported_at >= _POSITION_EVERY_S:
            self.reported_at = time.monotonic()
            self.coordinator.advance.remote(self.rank, clock, epoch, next_step)
        while len(self.pending) > _MAX_IN_FLIGHT:  # n_fetch >> n_push: keep memory bounded
            kind, refs = self.pending[0]
            if kind == "exchange":
                break
            ray.get(refs)
            self.pending.pop(0)

    def _refresh(self) -> None:
        """Install the newest parameters the shards sent (pulling now if none is on its way)."""
        import ray

        exchanges = [refs for kind, refs in self.pending if kind == "exchange"]
        if not exchanges:
            for _, refs in self.pending:
                ray.get(refs)
            self.pending = []
            self._install(ray.get([s.pull.remote() for s in self.shards]))
            return
        if self.options.overlap and len(exchanges) == 1:
            ready, _ = ray.wait(exchanges[0], num_returns=len(exchanges[0]), timeout=0)
            if len(ready) < len(exchanges[0]):
                return  # still in flight: one more step on the weights we hold
        newest = None
        for kind, refs in self.pending:
            result = ray.get(refs)
            if kind == "exchange":
                newest = result
        self.pending = []
        self._install(newest)

    def _install(self, pulled: list[tuple[int, np.ndarray, np.ndarray | None]]) -> None:
        self.versions = [version for version, _, _ in pulled]
        flat = torch.cat([torch.from_numpy(part) for _, part, _ in pulled])
        load_parameters(self.model, flat.to(self.device))
        if self.has_buffers and pulled[0][2] is not None:
            load_buffers(self.model, torch.from_numpy(pulled[0][2]).to(self.device))


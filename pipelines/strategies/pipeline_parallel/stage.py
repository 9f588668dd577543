"""One pipeline stage: a contiguous run of the model's layers in its own actor.

Stages pass activations forward and their gradients backward with torch.distributed
point-to-point (gloo on CPU, NCCL between GPU stages); Ray only starts the stages and asks
each for one epoch at a time, so no per-micro-batch call goes through Ray. Every stage
runs its own list of actions from the schedule (`schedules`); sends are
asynchronous and receives are posted a little ahead but waited for where the action needs
them (`inbox`), so any schedule that `simulation.simulate` accepts runs without deadlock;
where one actor holds two consecutive model stages (the turn of a V) the tensor passes
between its chunks in memory. Gradients are accumulated over the micro-batches (each loss scaled by
1/M), averaged over the R replicas of the stage, and applied once per mini-batch: one
step equals a single-process step on the whole mini-batch.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from pipelines.config import RunConfig
from pipelines.data import Dataset
from pipelines.strategies.pipeline_parallel.actions import (
    BACKWARD,
    FORWARD,
    holder,
    placement_of,
    splits,
    stage_of,
)
from pipelines.strategies.pipeline_parallel.inbox import Inbox
from pipelines.strategies.pipeline_parallel.schedules import build
from pipelines.training import schedule as lr_schedule
from pipelines.training.flat import unflatten_into
from pipelines.training.loop import (
    InMemory,
    build_model,
    make_optimizer,
    restore_optimizer,
    run_steps_per_epoch,
    steps_per_epoch,
)
from pipelines.training.precision import autocast


def _torch_backward_split():
    """torch's own split of a backward into input and weight gradients, or None on a torch
    without it (split schedules then run fused backwards at W). Imported only by split
    schedules: `torch.distributed.pipelining` costs a stage actor 1.2 s of start-up (it
    brings sympy and torch.distributed.tensor), which the fused schedules never use."""
    try:
        from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
    except ImportError:  # pragma: no cover - another torch
        return None
    return stage_backward_input, stage_backward_weight


ACTIVATION, GRADIENT = 0, 1
"""Message tags, 2L + kind on the link from model stage L to L + 1: activations flow to the
next stage, their gradients to the previous one; with interleaving two actors share several
links (chunk 0 to 1 and chunk 1 to 2 both go from actor 0 to 1 when P = 2)."""


class PipelineStage:
    def __init__(self, stage: int, replica: int, run: RunConfig, data: Dataset,
                 bounds: list[tuple[int, int]], shapes: list[tuple[int, ...]], state: dict):
        self.stage, self.replica, self.run_config = stage, replica, run
        self.options = run.strategy.options
        self.stages, self.replicas = self.options.stages, self.options.replicas
        self.virtual = len(bounds)
        """Chunks this actor holds (strategy.virtual_stages); the schedule's placement says
        which model stage each is (`actions.stage_of`)."""
        plan = build(self.options.schedule, self.stages, self.options.microbatches, self.virtual)
        self.schedule, self.split, self.placement = plan[stage], splits(plan), placement_of(plan)
        self.final = self.stages * self.virtual - 1
        """The model's last stage."""
        self.device = torch.device("cuda" if run.resources.gpus_per_worker > 0 else "cpu")
        self.model = build_model(run, data)
        self.layers = self.model.pipeline_layers()
        self.first, self.last = self._holds(0), self._holds(self.final)
        """Whether this actor holds the model's first (it reads the inputs) or last stage (the labels)."""
        self.bounds = [tuple(b) for b in bounds]
        self.blocks = [nn.Sequential(*self.layers[a:b]).to(self.device) for a, b in self.bounds]
        self.model.to(self.device)  # output_loss may use the model's own modules
        self.shapes = shapes
        """shapes[L]: the activation entering model stage L, per micro-batch (without batch size)."""
        every = [p for block in self.blocks for p in block.parameters()]
        self.optimizer = make_optimizer(run.optim, every, run_steps_per_epoch(run, data))
        for block, weights in zip(self.blocks, state["blocks"]):
            block.load_state_dict(weights)
        if state["optimizer"] is not None:
            restore_optimizer(self.optimizer, state["optimizer"], run.optim)
        self.rows, self.stream_rows = self._rows(data), data.stream.rows if data.stream else 0
        self.params = [[p for p in block.parameters() if p.requires_grad] for block in self.blocks]
        """Per chunk, the weights a split backward's W computes gradients for."""
        self.backward_split = _torch_backward_split() if self.split else None
        if self.split and self.backward_split is None and stage == 0:
            print(f"pipeline: this torch ({torch.__version__}) has no stage_backward_input: "
                  f"{self.options.schedule}'s backwards run whole at W", flush=True)

    def address(self) -> tuple[str, int]:
        """Where stage 0 of replica 0 hosts the process group's rendezvous."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int) -> float:
        """Form the process group of all stages. Returns the wall-clock time this stage
        began to join, its actor built by then (the start-up timeline's `stages_ready`)."""
        ready = time.time()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}",
                                rank=self.rank(self.stage, self.replica),
                                world_size=self.stages * self.replicas, timeout=timedelta(minutes=5))
        # Every rank creates every group, in the same order (torch.distributed's rule).
        groups = [dist.new_group([self.rank(s, r) for r in range(self.replicas)])
                  for s in range(self.stages)]
        self.replica_group = groups[self.stage]
        return ready

    def rank(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    # --- training ------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict:
        run = self.run_config
        torch.manual_seed(run.seed * 1009 + self.rank(self.stage, self.replica) + epoch * 7919)
        for block in self.blocks:
            block.train()
        began = time.perf_counter()
        busy, loss_sum, steps, samples, peak = 0.0, 0.0, 0, 0, 0
        first_step_at = None
        timeline: list[tuple[str, float, float]] = []
        for micro in self._microbatches(epoch):
            timeline = []
            self.optimizer.zero_grad(set_to_none=True)
            step_busy, loss, step_peak = self._run_schedule(micro, began, timeline)
            busy += step_busy
            peak = max(peak, step_peak)
            self._average_over_replicas()
            self.optimizer.step()
            if not steps:  # wall clock: the driver compares it with the run's launch
                first_step_at = time.time()
            loss_sum += loss
            steps += 1
            samples += sum(len(m[1]) for m in micro)
        wall = time.perf_counter() - began
        if self.last and not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss became {loss_sum} in epoch {epoch + 1}; "
                                     "lower optim.lr or set optim.grad_clip")
        return {"stage": self.stage, "replica": self.replica, "loss_sum": loss_sum, "steps": steps,
                "samples": samples, "busy": busy, "wall": wall, "peak_activation_bytes": peak,
                "timeline": timeline, "first_step_at": first_step_at}

    def observe(self, metrics: dict[str, float]) -> None:
        """The epoch's metrics, as the driver computed them (`optim.schedule` plateau)."""
        lr_schedule.observe(self.optimizer.param_groups, self.run_config.optim, metrics)

    def _run_schedule(self, micro: tuple[torch.Tensor, ...], began: float, timeline: list):
        o, final = self.options, self.final
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        """Keyed by (micro-batch, chunk)."""
        sends: list = []
        rng: dict[tuple[int, int], torch.Tensor] = {}
        weights: dict[tuple[int, int], tuple] = {}
        """Per micro-batch between its B and W: what the weights' gradient is computed from."""
        handed: dict[tuple[str, int, int], torch.Tensor] = {}
        """Between this actor's own chunks (a V's turn): (kind, receiving model stage, micro-batch)."""
        busy, loss_total, live, peak = 0.0, 0.0, 0, 0
        inbox = Inbox(self._wanted(micro), self.device)
        for k, action in enumerate(self.schedule):
            i, chunk = action.microbatch, action.chunk
            key, here = (i, chunk), self._stage_of(chunk)  # `here`: the model stage
            inbox.before(k)
            if action.kind == FORWARD:
                x = self._input(micro[i], here, inbox, k, handed.pop(("activation", here, i), None))
                start = time.perf_counter()
                if o.activation_checkpointing:
                    rng[key] = torch.get_rng_state()  # the recomputation must draw the same dropout
                    with torch.no_grad():
                        out = self._forward(x, chunk)
                else:
                    out = self._forward(x, chunk)
                if here == final:
                    out = self.model.output_loss(out, self._batch(micro[i])) / o.microbatches
                    loss_total += float(out.detach())
                busy += self._stamp(timeline, "F", start, began)
                inputs[key], outputs[key] = x, out
                live += _bytes(x) + (0 if o.activation_checkpointing else _bytes(out))
                peak = max(peak, live)
                if here != final and self._holds(here + 1):
                    handed[("activation", here + 1, i)] = out.detach()
                elif here != final:
                    sends.append(dist.isend(out.detach().contiguous(), self._peer(here + 1),
                                            tag=2 * here + ACTIVATION))
            elif action.kind == BACKWARD:
                if here == final:
                    grad = None  # the loss's own
                elif self._holds(here + 1):
                    grad = handed.pop(("gradient", here, i))
                else:
                    grad = inbox.take(k)
                start = time.perf_counter()
                x, out = inputs[key], outputs[key]
                if o.activation_checkpointing:
                    now = torch.get_rng_state()
                    torch.set_rng_state(rng.pop(key))
                    out = self._forward(x, chunk)
                    torch.set_rng_state(now)
                    if here == final:
                        out = self.model.output_loss(out, self._batch(micro[i])) / o.microbatches
                if self.split:
                    # the input's gradient only, sent upstream at once; W takes the weights'
                    outputs[key], weights[key] = out, self._backward_input(out, grad, x, here, chunk)
                else:
                    out.backward(grad)
                    del inputs[key], outputs[key]
                    live -= _bytes(x) + (0 if o.activation_checkpointing else _bytes(out))
                busy += self._stamp(timeline, "B", start, began)
                if here > 0 and self._holds(here - 1):
                    handed[("gradient", here - 1, i)] = x.grad
                elif here > 0:
                    sends.append(dist.isend(x.grad.contiguous(), self._peer(here - 1),
                                            tag=2 * (here - 1) + GRADIENT))
            else:  # WEIGHT
                start = time.perf_counter()
                x, out = inputs.pop(key), outputs.pop(key)
                self._backward_weight(out, *weights.pop(key), chunk)
                busy += self._stamp(timeline, "W", start, began)
                live -= _bytes(x) + (0 if o.activation_checkpointing else _bytes(out))
        for work in sends:
            work.wait()
        assert inbox.drained() and not handed, "a posted receive or a hand-off was never used"
        return busy, loss_total, peak

    def _wanted(self, micro: tuple) -> list:
        """Per action of the schedule, (peer, shape, tag) of what it receives, or None: a
        forward receives its input from the stage before (but the model's first), a backward
        its output's gradient from the stage after (but the model's last); nothing comes
        over the wire from a stage this actor holds itself."""
        final, wanted = self.final, []
        for action in self.schedule:
            here, rows = self._stage_of(action.chunk), len(micro[action.microbatch][1])
            if action.kind == FORWARD and here > 0 and not self._holds(here - 1):
                wanted.append((self._peer(here - 1), (rows, *self.shapes[here]), 2 * (here - 1) + ACTIVATION))
            elif action.kind == BACKWARD and here != final and not self._holds(here + 1):
                wanted.append((self._peer(here + 1), (rows, *self.shapes[here + 1]), 2 * here + GRADIENT))
            else:
                wanted.append(None)
        return wanted

    def _backward_input(self, out: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor,
                        here: int, chunk: int) -> tuple:
        """B of a split backward: x's gradient, keeping what W needs. The first stage's input
        needs no gradient, and a torch without `stage_backward_input` has no split: both
        run the whole backward at W instead (said in the log once)."""
        if here == 0 or self.backward_split is None:
            return (grad, None)
        backward_input, _ = self.backward_split
        _, groups = backward_input([out], None if grad is None else [grad], [x], self.params[chunk])
        return (grad, groups)

    def _backward_weight(self, out: torch.Tensor, grad: torch.Tensor | None, groups, chunk: int) -> None:
        """W: the weights' gradients, added to .grad, from what B kept."""
        if groups is None:
            out.backward(grad)  # the whole backward: no B ran before it
        else:
            self.backward_split[1](self.params[chunk], groups)

    def _forward(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """The chunk's output, its products under `optim.precision`'s autocast; float32 on
        the wire, the dtype the next stage's buffers and this stage's gradient buffers hold."""
        with autocast(self.run_config.optim.precision, self.device):
            return self.blocks[chunk](x).float()

    def _rows(self, data: Dataset):
        """Where this stage's rows come from: memory, or, for a streamed table, a stream of
        every training row that the first and last stages of each replica read alike (the
        same batches in the same order) while a middle stage reads none."""
        if data.stream is None:
            return InMemory(data.x_train.to(self.device), data.y_train.to(self.device))
        if not (self.first or self.last):
            return None
        from pipelines.streaming import Streamed

        return Streamed(table=data.stream, whole=True)

    def _microbatches(self, epoch: int):
        """Each step's micro-batches of this replica's share of the global batch, as (x, y);
        a stage that reads no rows gets (None, row count) to size what it receives."""
        run, m = self.run_config, self.options.microbatches
        where = dict(seed=run.seed, epoch=epoch, rank=self.replica, world=self.replicas,
                     cap=run.optim.steps_per_epoch)
        if self.rows is not None:
            for x, y in self.rows.epoch(run.data.batch_size, device=self.device, **where):
                yield list(zip(x.chunk(m), y.chunk(m)))
            return
        share = len(range(self.replica, run.data.batch_size, self.replicas))
        sizes = [len(c) for c in torch.arange(share).chunk(m)]
        for _ in range(steps_per_epoch(self.stream_rows, run.data.batch_size, run.optim.steps_per_epoch)):
            yield [(None, range(k)) for k in sizes]

    def _input(self, micro: tuple, here: int, inbox: Inbox, k: int,
               handed: torch.Tensor | None) -> torch.Tensor:
        """What model stage `here` forwards: the inputs for the first, else what the stage
        before sent (`handed` over, where this actor holds that stage too)."""
        if here == 0:  # a denoising model corrupts what its first layer sees
            x = micro[0]
            return self.model.training_input(x) if hasattr(self.model, "training_input") else x
        return (handed if handed is not None else inbox.take(k)).requires_grad_()

    @staticmethod
    def _batch(micro: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return micro

    def _peer(self, model_stage: int) -> int:
        """The rank holding `model_stage` in this replica."""
        return self.rank(holder(model_stage, self.stages, self.placement)[0], self.replica)

    def _holds(self, model_stage: int) -> bool:
        return holder(model_stage, self.stages, self.placement)[0] == self.stage

    def _stage_of(self, chunk: int) -> int:
        return stage_of(self.stage, chunk, self.stages, self.placement)

    def _average_over_replicas(self) -> None:
        if self.replicas == 1:
            return
        grads = [p.grad for block in self.blocks for p in block.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.replica_group)
        unflatten_into(grads, flat / self.replicas)

    @staticmethod
    def _stamp(timeline: list, kind: str, start: float, began: float) -> float:
        end = time.perf_counter()
        timeline.append((kind, start - began, end - began))
        return end - start

    # --- state ---------------------------------------------------------------------------

    def state(self) -> dict:
        """Per chunk, its layers' bounds and weights; the optimizer of all of them."""
        return {"blocks": [{k: v.detach().cpu().clone() for k, v in block.state_dict().items()}
                           for block in self.blocks],
                "optimizer": self.optimizer.state_dict(), "bounds": self.bounds}


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

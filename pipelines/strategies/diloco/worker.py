"""A DiLoCo worker: a model replica that takes H inner steps on its own share of each
global batch between two synchronisations, with an inner optimizer that it keeps from round
to round (the paper's inner AdamW state stays on the worker).

A round starts from the global parameters the driver sends and ends by sending back the
pseudo-gradient, the start minus where the H steps led: the outer optimizer treats it as a
gradient of the global parameters. A round may span several epochs (`plan`): it takes each
epoch's steps in turn and reports them apart.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from pipelines.config import RunConfig
from pipelines.data import Dataset
from pipelines.training import precision
from pipelines.training.flat import (
    flat_buffers,
    flat_parameters,
    load_buffers,
    load_parameters,
    to_wire,
    trainable,
)
from pipelines.training.link import Link
from pipelines.training.loop import (
    InMemory,
    Objective,
    build_model,
    make_optimizer,
    run_steps_per_epoch,
    train_epoch,
)


class DiLoCoWorker:
    def __init__(self, rank: int, world: int, run: RunConfig, data: Dataset, device: str):
        self.rank, self.world, self.run_config = rank, world, run
        self.device = torch.device(device)
        self.model = build_model(run, data).to(self.device)
        self.optimizer = make_optimizer(run.optim, trainable(self.model), run_steps_per_epoch(run, data))
        self.rows = self._rows(data)
        self.loss_scaler = precision.scaler(run.optim.precision, self.device)
        self.has_buffers = flat_buffers(self.model).numel() > 0
        self.link = Link(run.resources.link_mbps)
        self.position: tuple[int, int] | None = None
        """(epoch, step) the open epoch's batches stand at; None: none open."""
        self.batches = None
        self.first_step_at: float | None = None
        """When the open round's first step ended."""

    def round(self, theta: np.ndarray, buffers: np.ndarray | None, segments: list[tuple[int, int, int]]) -> dict:
        """The round's segments (epoch, start, stop) from `theta`, in order; the
        pseudo-gradient and each segment's figures."""
        run = self.run_config
        began = time.time()
        epoch, start, _ = segments[0]
        torch.manual_seed(run.seed * 1009 + self.rank * 7919 + epoch * 104_729 + start)  # dropout: per round
        start_flat = torch.tensor(theta, device=self.device)  # the object store hands out read-only views
        load_parameters(self.model, start_flat)
        if self.has_buffers and buffers is not None:
            load_buffers(self.model, torch.from_numpy(buffers).to(self.device))
        self.first_step_at = None
        figures = []
        for epoch, start, stop in segments:
            # The shared loop's steps (clipping, a loss that is not finite) on these batches.
            mean_loss, samples = train_epoch(Objective(self.model), self.optimizer, self._steps(epoch, start, stop),
                                             run.optim.grad_clip, precision=run.optim.precision,
                                             loss_scaler=self.loss_scaler)
            figures.append({"epoch": epoch, "loss_sum": mean_loss * (stop - start), "steps": stop - start,
                            "samples": samples, "ended": time.time()})
        delta = start_flat - flat_parameters(self.model)
        wire = to_wire(delta.cpu(), run.strategy.options.push_dtype)
        self.link.send(wire.nbytes)
        return {"delta": wire, "segments": figures,
                "buffers": flat_buffers(self.model).cpu().numpy() if self.has_buffers else None,
                "began": began, "first_step_at": self.first_step_at or time.time(), "ended": time.time(),
                "link_wait_s": self.link.waited_s}

    def _rows(self, data: Dataset):
        """In memory, or a streamed table's every training row, of whose global batches this
        worker takes its rows (`Streamed(whole=True)`, as a pipeline's replicas): each worker
        reads the whole stream, W times the reads of `ps`'s own parts, so that an epoch has the
        same known number of global batches on every worker (a round is H steps of all of
        them) and H = 1 averaging takes `local`'s steps on a streamed table too."""
        if data.stream is None:
            return InMemory(data.x_train.to(self.device), data.y_train.to(self.device))
        from pipelines.streaming import Streamed

        return Streamed(table=data.stream, whole=True)

    def _steps(self, epoch: int, start: int, stop: int):
        """This worker's share of the global batches [start, stop) of `epoch`, continuing
        the open epoch's batch plan where the last round left it."""
        run = self.run_config
        if self.position != (epoch, start):
            self.batches = self.rows.epoch(run.data.batch_size, seed=run.seed, epoch=epoch, rank=self.rank,
                                           world=self.world, cap=run.optim.steps_per_epoch, device=self.device)
            for _ in range(start):  # a replacement (or a resumed run) joins mid-epoch
                next(self.batches)
        for step in range(start, stop):
            self.position = (epoch, step + 1)
            yield next(self.batches)
            if self.first_step_at is None:  # asked for the next batch: the round's first step is done
                self.first_step_at = time.time()

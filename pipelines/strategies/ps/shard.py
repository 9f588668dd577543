"""One parameter-server shard: a slice of the flat parameter vector and its optimizer.

A shard applies every gradient slice it receives with its own optimizer state (SGD with
momentum, Adagrad as Downpour did, Adam...), counts its updates (the version) and records
each update's staleness: its version when the gradient arrived minus the version the
gradient was computed on. Every `snapshot_every` updates it writes its slice, optimizer
state and version to disk; Ray restarts a killed shard, whose constructor then resumes from
that snapshot, so a crash loses at most `snapshot_every` updates.

The driver writes each shard's starting state to its snapshot file before starting it.
Tensors travel as NumPy buffers (one contiguous array per push or pull), which Ray moves
without pickling their contents.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipelines.config import OptimSection
from pipelines.errors import quiet_numpy_views
from pipelines.strategies.ps.shard_optimizer import ShardOptimizer
from pipelines.training.flat import from_wire
from pipelines.training.loop import restore_optimizer

# Arrays arriving through Ray's object store are read-only views; a shard only reads them.
quiet_numpy_views()


class ParameterShard:
    def __init__(self, index: int, optim: OptimSection, device: str, snapshot_dir: str,
                 snapshot_every: int, staleness_aware_lr: bool, pushes_per_epoch: int | None = None):
        """The shard's state comes from its snapshot file, which the driver writes before
        starting it: Ray re-runs this constructor after a crash, and a file (unlike
        constructor arguments in the object store) outlives the first start."""
        torch.set_num_threads(1)  # a shard's work is a few vector operations per push
        self.index, self.device = index, torch.device(device)
        self.snapshot_every = snapshot_every
        self.snapshot_path = snapshot_file(snapshot_dir, index)
        state = torch.load(self.snapshot_path, weights_only=True)  # tensors and plain values only
        self.param = state["param"].clone().to(self.device)
        self.buffers = None if state["buffers"] is None else state["buffers"].clone()
        self.optim = optim
        # the schedule follows this shard's own count of applied pushes (every worker's);
        # not torch.optim, whose first step imports torch._dynamo (`shard_optimizer`)
        self.optimizer = ShardOptimizer(optim, self.param, pushes_per_epoch)
        self.staleness_aware_lr = staleness_aware_lr
        self._restore(state)
        self.incarnation += 1  # 0 on the first start
        self.restored_version = self.version if self.incarnation else None
        if self.incarnation:
            self._snapshot()  # the restart itself is counted even if it dies again soon

    # --- the hot path ------------------------------------------------------------------

    def push(self, gradient: np.ndarray, version: int, buffers: np.ndarray | None = None,
             epoch: int = 0) -> int:
        """Apply one gradient computed on parameters of `version` in the worker's `epoch`;
        returns the new version."""
        staleness = max(self.version - version, 0)  # < 0 only after a restart lost updates
        self.histograms.setdefault(epoch, Counter())[staleness] += 1
        if self.staleness_aware_lr:
            for group in self.optimizer.param_groups:
                group["lr_scale"] = 1.0 / (staleness + 1)
        self.optimizer.step(from_wire(gradient).to(self.device, non_blocking=True))
        if buffers is not None and self.buffers is not None:
            self.buffers.copy_(torch.from_numpy(buffers))
        self.version += 1
        if self.version % self.snapshot_every == 0:
            self._snapshot()
        return self.version

    def pull(self) -> tuple[int, np.ndarray, np.ndarray | None]:
        """(version, this shard's parameter slice, the buffers if this shard holds them)."""
        buffers = None if self.buffers is None else self.buffers.numpy()
        return self.version, self.param.detach().cpu().numpy(), buffers

    def exchange(self, gradient: np.ndarray, version: int, buffers: np.ndarray | None = None,
                 epoch: int = 0):
        """Push then pull in one round trip."""
        self.push(gradient, version, buffers, epoch)
        return self.pull()

    # --- for the driver ------------------------------------------------------------------

    def stats(self, epochs=None) -> dict:
        """Version, restarts, and the staleness histograms of `epochs` (default: all)."""
        wanted = self.histograms.keys() if epochs is None else [e for e in epochs if e in self.histograms]
        return {"version": self.version, "incarnation": self.incarnation,
                "restored_version": self.restored_version,
                "histograms": {e: dict(self.histograms[e]) for e in wanted},
                "pid": os.getpid()}

    def state(self) -> dict:
        """Everything a checkpoint needs to rebuild this shard."""
        return {"param": self.param.detach().cpu().clone(),
                "buffers": None if self.buffers is None else self.buffers.clone(),
                "optimizer": _to_cpu(self.optimizer.state_dict()), "version": self.version,
                "incarnation": self.incarnation,
                "histograms": {e: dict(h) for e, h in self.histograms.items()}}

    # --- snapshots ----------------------------------------------------------------------

    def _snapshot(self) -> None:
        self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.snapshot_path.with_suffix(f".{time.time_ns()}.tmp")
        torch.save(self.state(), partial)
        os.replace(partial, self.snapshot_path)  # a crash mid-write leaves the old snapshot whole

    def _restore(self, state: dict) -> None:
        if state.get("optimizer"):
            restore_optimizer(self.optimizer, state["optimizer"], self.optim)
        self.version = state.get("version", 0)
        self.incarnation = state.get("incarnation", -1)
        self.histograms = {e: Counter(h) for e, h in state.get("histograms", {}).items()}


def snapshot_file(snapshot_dir: str | Path, index: int) -> Path:
    return Path(snapshot_dir) / f"shard_{index:03d}.pt"


def write_initial_state(snapshot_dir: str | Path, index: int, param: torch.Tensor,
                        buffers: torch.Tensor | None, resumed: dict | None = None) -> None:
    """What shard `index` starts from: fresh weights, or the state of a checkpoint."""
    state = {"param": param.detach().cpu().clone(), "buffers": buffers, "optimizer": None,
             "version": 0, "incarnation": -1, "histograms": {}}
    if resumed is not None:
        state.update(resumed, incarnation=-1)
    path = snapshot_file(snapshot_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value

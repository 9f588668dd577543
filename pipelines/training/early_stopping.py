"""Early stopping: the best epoch of a watched metric, and when to give up on it.

The watcher's state (the best value, its epoch, its weights, the epochs waited since)
travels in every checkpoint, so a resumed run or a restarted worker group goes on judging
where it left off, and the best weights survive the pruning of older checkpoints and a
move between nodes. A run that stops says why in one line (and in the MLflow tag
`raydeep.stopped_early`), logs `best_epoch` and `stopped_early`, and is tested with the best
epoch's weights. Under allreduce every rank watches the same all-reduced metrics, so every
rank stops after the same epoch.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from pipelines.errors import ConfigError
from pipelines.optim_config import EarlyStoppingSection

STATE_KEY = "early_stopping"
"""Where a checkpoint holds the watcher's state."""


class EarlyStopping:
    def __init__(self, section: EarlyStoppingSection, state: dict[str, Any] | None = None):
        self.section = section
        state = state or {}
        self.best_value: float | None = state.get("best_value")
        self.best_epoch: int | None = state.get("best_epoch")
        self.best_model: dict | None = state.get("model")
        self.wait: int = state.get("wait", 0)
        self.stopped: bool = state.get("stopped", False)

    @property
    def active(self) -> bool:
        return self.section.metric is not None

    def update(self, epoch: int, metrics: dict[str, float], model_state: Callable[[], dict]) -> bool:
        """Judge epoch `epoch`; True when the run should stop after it."""
        if not self.active:
            return False
        name = self.section.metric
        if name not in metrics:
            raise ConfigError(f"optim.early_stopping.metric {name} is not reported; this run reports "
                              f"{', '.join(sorted(metrics))}")
        value, sign = metrics[name], 1.0 if self.section.maximise else -1.0
        improved = math.isfinite(value) and (
            self.best_value is None or sign * (value - self.best_value) > self.section.min_delta)
        if improved:
            self.best_value, self.best_epoch, self.wait = value, epoch, 0
            self.best_model = {k: v.detach().cpu().clone() for k, v in model_state().items()}
        else:
            self.wait += 1
        self.stopped = self.wait >= self.section.patience
        return self.stopped

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "model": self.best_model,
                "wait": self.wait, "stopped": self.stopped, "reason": self.reason() if self.stopped else None}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {STATE_KEY: self.state()} if self.active else {}

    def reason(self) -> str:
        s = self.section
        return (f"stopped early: {s.metric} has not improved by more than {s.min_delta:g} for {s.patience} "
                f"epoch(s) since epoch {self.best_epoch + 1} ({self.best_value:.4f})")


def outcome(state: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor] | None, dict[str, float], str | None]:
    """From a watcher's final state: (the best weights to test, the figures to log, why it
    stopped); (None, {}, None) where nothing was watched."""
    if not state or state.get("best_epoch") is None:
        return None, {}, None
    figures = {"best_epoch": float(state["best_epoch"] + 1), "stopped_early": float(bool(state["stopped"]))}
    return state["model"], figures, state.get("reason")


def check_metric(setting: str, metric: str | None, reported: list[str]) -> None:
    """Refuse a watched metric (`setting`: early stopping's, plateau's) the run will not
    report, before anything starts."""
    if metric is not None and metric not in reported:
        raise ConfigError(f"{setting} {metric} is not reported by this run; it reports {', '.join(reported)}")

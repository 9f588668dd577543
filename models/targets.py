"""Regression targets: what turns a supervised model's output into a regressor.

A model that regresses has one output per example, trained to predict the target
standardised by the training split's mean and standard deviation: on raw targets of
large or tiny scale the same learning rate would diverge or crawl, as raw features do
(issue 17). The scale lives in the model (buffers `targets.mean`, `targets.std`), so
`predict` and every metric are in the target's own units, and a logged model predicts them.

Metrics are per-example sums like every model's (strategies add them over batches and
workers before dividing); `finish_means` turns the means into RMSE and R², which are not
means of per-example values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("classification", "regression")
"""What a run's labels are (`data.task`): classes, or a target to regress."""


class RegressionTarget(nn.Module):
    """The training split's target scale, and the loss and metrics of a regressor."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std) if std > 0 else 1.0))

    def scaled(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the standardised target."""
        return F.mse_loss(output[:, 0], self.scaled(y))

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, 0] * self.std + self.mean

    def sums(self, output: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """`loss` is the standardised squared error (the training loss's scale), `mse` and
        `mae` are in the target's units; `target`/`target_sq` (the standardised target and
        its square) give R² its variance. Centred on the training mean, those sums do not
        cancel digits the way sums of raw targets of 1e6 would."""
        t = self.scaled(y)
        error = output[:, 0] - t
        squared = (error ** 2).sum()
        return {"loss": squared, "mse": squared * self.std ** 2, "mae": error.abs().sum() * self.std,
                "target": t.sum(), "target_sq": (t ** 2).sum(),
                "count": torch.tensor(float(len(y)), device=output.device)}


def finish_means(means: dict[str, float]) -> dict[str, float]:
    """Means of `sums` with RMSE and R² (1 - squared error / the set's own variance, as
    scikit-learn's `r2_score`) in place of the helper sums; other means pass through."""
    if "target_sq" not in means:
        return means
    means = dict(means)
    t, t2 = means.pop("target"), means.pop("target_sq")
    variance = t2 - t * t
    means["rmse"] = math.sqrt(max(means["mse"], 0.0))
    if variance > 0:
        means["r2"] = 1.0 - means["loss"] / variance
    return means


def supports_regression(model: nn.Module) -> bool:
    return callable(getattr(model, "regress", None))

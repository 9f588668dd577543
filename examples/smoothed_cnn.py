"""A user's model with its own loss and metrics: label smoothing, and top-2 accuracy.

    raydeep run --model examples.smoothed_cnn:make_cnn --set model.init_args.smoothing=0.1

A factory function works as well as a class. `loss(batch)` is the training objective (a
mean over the batch); `evaluate(batch)` returns per-example *sums* and `count`, which every
strategy adds over batches and workers before dividing (`models/contract.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmoothedCNN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 16,
                 smoothing: float = 0.1):
        super().__init__()
        self.smoothing = smoothing
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, -1)) if len(input_shape) == 1 else nn.Identity(),
            nn.Conv2d(input_shape[0] if len(input_shape) == 3 else 1, channels, 3, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(channels * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=self.smoothing)

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        top2 = logits.topk(2, dim=1).indices
        return {"loss": F.cross_entropy(logits, y, reduction="sum"),
                "accuracy": (top2[:, 0] == y).sum().float(),
                "top2_accuracy": (top2 == y[:, None]).any(dim=1).sum().float(),
                "count": torch.tensor(float(len(y)))}


def make_cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 16,
             smoothing: float = 0.1) -> nn.Module:
    return SmoothedCNN(input_shape, num_classes, channels, smoothing)

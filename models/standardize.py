"""A trained model with the standardisation its table's training split was fitted with, so
that the logged model takes the table's raw columns (`mlflow.pytorch.load_model(...)(raw)`)."""
from __future__ import annotations

import torch
from torch import nn


class Standardized(nn.Module):
    """`model((x - mean) / std)`: the model trained on standardised features, fed raw ones."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.task = getattr(model, "task", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        own = getattr(self.model, "predict", None)  # a user's own module may have none
        return own(z) if callable(own) else self.model(z).argmax(dim=1)

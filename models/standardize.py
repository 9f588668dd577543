"""A trained model as it is logged for a table: it takes the table's raw columns, applies
the standardisation its training split was fitted with, and gives a regressor's prediction
in the target's units (`mlflow.pytorch.load_model(...)(raw)`)."""
from __future__ import annotations

import torch
from torch import nn


class Standardized(nn.Module):
    """`model((x - mean) / std)`: the model trained on standardised features, fed raw ones
    (of any numeric dtype, and flat rows where the model takes a shape); a regressor's
    forward is its prediction."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.input_shape = tuple(input_shape) if input_shape is not None else tuple(mean.shape)
        self.task = getattr(model, "task", None)

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.dtype).reshape(len(x), *self.input_shape)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.standardized(x)
        return self.model.predict(z) if self.task == "regression" else self.model(z)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        z = self.standardized(x)
        own = getattr(self.model, "predict", None)  # a user's own module may have none
        return own(z) if callable(own) else self.model(z).argmax(dim=1)

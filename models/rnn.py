"""Elman recurrent network, stacked layers; an image's rows are its time steps."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.base import Classifier
from models.registry import ModelSpec, register


@dataclass
class RNNConfig:
    hidden: int = 128
    """Units of each recurrent layer."""
    layers: int = 1
    """Stacked recurrent layers."""
    nonlinearity: str = "tanh"
    """tanh or relu (Elman cell)."""
    dropout: float = 0.0
    """Dropout between stacked layers."""


class RNN(Classifier):
    def __init__(self, cfg: RNNConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(
                f"rnn needs a sequence (steps, features) or an image (channels, rows, cols), "
                f"got shape {tuple(input_shape)}; set data.input_shape"
            )
        if cfg.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"rnn nonlinearity must be tanh or relu, got {cfg.nonlinearity!r}")
        if cfg.layers < 1 or cfg.hidden < 1:
            raise ValueError(f"rnn needs layers >= 1 and hidden >= 1, got {cfg.layers} and {cfg.hidden}")
        # An image (C, H, W) is read row by row: H steps of C*W features.
        features = input_shape[-1] * (input_shape[0] if len(input_shape) == 3 else 1)
        self.rnn = nn.RNN(
            features, cfg.hidden, num_layers=cfg.layers, nonlinearity=cfg.nonlinearity,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0, batch_first=True,
        )
        self.head = nn.Linear(cfg.hidden, num_classes)

    def forward(self, x):
        if x.dim() == 4:  # (N, C, H, W) -> (N, H, C*W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


register(ModelSpec("rnn", RNNConfig, RNN, "Elman RNN, stacked; image rows as time steps"))

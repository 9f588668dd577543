"""Recurrent networks: stacked Elman (or LSTM/GRU) layers with a deep hidden-to-output map.

An image's rows are its time steps. Depth comes in two places (Pascanu et al., "How to
construct deep recurrent neural networks"): stacked recurrent layers, and an MLP between
the last hidden state and the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import Classifier, activation
from models.registry import ModelSpec, register

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RNNConfig:
    hidden: int = 128
    """Units of each recurrent layer."""
    layers: int = 1
    """Stacked recurrent layers."""
    cell: str = "rnn"
    """rnn (Elman), lstm or gru."""
    nonlinearity: str = "tanh"
    """tanh or relu (Elman cell only)."""
    head_layers: int = 0
    """Hidden layers of the hidden-to-output MLP (0: a linear read-out)."""
    head_width: int = 128
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
        if cfg.cell not in CELLS:
            raise ValueError(f"rnn cell must be one of {', '.join(CELLS)}, got {cfg.cell!r}")
        if cfg.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"rnn nonlinearity must be tanh or relu, got {cfg.nonlinearity!r}")
        if cfg.layers < 1 or cfg.hidden < 1:
            raise ValueError(f"rnn needs layers >= 1 and hidden >= 1, got {cfg.layers} and {cfg.hidden}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"rnn dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.head_layers < 0 or cfg.head_width < 1:
            raise ValueError(f"rnn needs head_layers >= 0 and head_width >= 1, "
                             f"got {cfg.head_layers} and {cfg.head_width}")
        # An image (C, H, W) is read row by row: H steps of C*W features.
        features = input_shape[-1] * (input_shape[0] if len(input_shape) == 3 else 1)
        extra = {"nonlinearity": cfg.nonlinearity} if cfg.cell == "rnn" else {}
        self.rnn = CELLS[cfg.cell](
            features, cfg.hidden, num_layers=cfg.layers, batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0, **extra)
        head: list[nn.Module] = []
        size = cfg.hidden
        for _ in range(cfg.head_layers):
            head += [nn.Linear(size, cfg.head_width), activation("relu")]
            size = cfg.head_width
        head.append(nn.Linear(size, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x):
        return self.head(LastStep(self.rnn)(x))

    def pipeline_layers(self) -> list[nn.Module]:
        """The recurrent stack as one layer (it cannot be split by time or depth without
        changing its kernels), then the read-out layers."""
        return [LastStep(self.rnn), *self.head]

    def output_loss(self, output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.objective(output, batch[1])


class LastStep(nn.Module):
    """The recurrent stack's output at the last time step; an image is read row by row."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (N, C, H, W) -> (N, H, C*W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        out, _ = self.rnn(x)
        return out[:, -1]


register(ModelSpec("rnn", RNNConfig, RNN, "stacked Elman/LSTM/GRU, deep read-out; image rows as time steps"))

"""Multi-layer perceptron (the course's DNN): depth, width, activation, dropout.

`projection` swaps the hidden layers' dense maps for structured ones (`models.structured`)
to compare accuracy against parameters. The output layer stays dense: with only as many
rows as classes it is small already, and padding it to a power of two would waste work.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.base import SequentialClassifier, activation, flat_size
from models.registry import ModelSpec, register
from models.structured import check_projection, projection


@dataclass
class MLPConfig:
    depth: int = 2
    """Number of hidden layers."""
    width: int = 256
    """Units per hidden layer."""
    activation: str = "relu"
    """relu, sigmoid, tanh, gelu or elu."""
    dropout: float = 0.0
    """Dropout probability after each hidden layer."""
    projection: str = "dense"
    """Linear map of the hidden layers: dense, fastfood or circulant (structured: best with adam)."""


class MLP(SequentialClassifier):
    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if cfg.depth < 0 or cfg.width < 1:
            raise ValueError(f"mlp needs depth >= 0 and width >= 1, got depth={cfg.depth} width={cfg.width}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"mlp dropout must be in [0, 1), got {cfg.dropout}")
        check_projection(cfg.projection)
        layers: list[nn.Module] = [nn.Flatten()]
        size = flat_size(input_shape)
        for _ in range(cfg.depth):
            layers += [projection(cfg.projection, size, cfg.width), activation(cfg.activation)]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            size = cfg.width
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)


register(ModelSpec("mlp", MLPConfig, MLP, "multi-layer perceptron (DNN)"))

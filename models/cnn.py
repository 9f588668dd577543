"""Convolutional network: conv + pooling stages, then a dense head.

`conv=local` unties each stage's kernel per position and `projection` makes the head's
hidden layer structured (`models.structured`): the course compares what weight sharing
and structure save against what they cost in accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from models.base import SequentialClassifier, activation
from models.registry import ModelSpec, register
from models.structured import LocallyConnected2d, check_projection, projection

POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
CONVS = ("conv", "local")


@dataclass
class CNNConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])
    """Output channels of each conv stage; each stage is conv -> activation -> pool."""
    kernel_size: int = 3
    pool: str = "max"
    """Pooling kind: max or avg."""
    pool_size: int = 2
    hidden: int = 128
    """Units of the dense layer before the output (0 for none)."""
    activation: str = "relu"
    batch_norm: bool = True
    """Batch normalisation after each convolution (per worker's shard under allreduce on CPU)."""
    dropout: float = 0.0
    projection: str = "dense"
    """Linear map of the head's hidden layer: dense, fastfood or circulant (best with adam)."""
    conv: str = "conv"
    """Each stage's filter: conv (shared kernel) or local (a kernel per position, untied)."""


class CNN(SequentialClassifier):
    def __init__(self, cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"cnn needs image input (channels, height, width), got shape {tuple(input_shape)}; "
                "set data.input_shape"
            )
        if cfg.pool not in POOLS:
            raise ValueError(f"unknown pool {cfg.pool!r} (known: {', '.join(POOLS)})")
        if cfg.conv not in CONVS:
            raise ValueError(f"unknown conv {cfg.conv!r} (known: {', '.join(CONVS)})")
        check_projection(cfg.projection)
        # Said here: torch would warn about empty tensors or divide by zero first.
        if cfg.kernel_size < 1 or cfg.pool_size < 1 or not all(out >= 1 for out in cfg.channels):
            raise ValueError(f"cnn needs kernel_size >= 1, pool_size >= 1 and positive channels, got "
                             f"{cfg.kernel_size}, {cfg.pool_size} and {list(cfg.channels)}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"cnn dropout must be in [0, 1), got {cfg.dropout}")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        pad = cfg.kernel_size // 2
        for i, out in enumerate(cfg.channels):
            # The filter keeps the map's size for odd kernels; an even one adds a row and a column.
            fh, fw = h + 2 * pad - cfg.kernel_size + 1, w + 2 * pad - cfg.kernel_size + 1
            h2, w2 = fh // cfg.pool_size, fw // cfg.pool_size
            if h2 < 1 or w2 < 1:
                raise ValueError(
                    f"cnn stage {i + 1} of {len(cfg.channels)} would pool a {fh}x{fw} map "
                    f"by {cfg.pool_size}: too many stages for input {tuple(input_shape)}"
                )
            layers += [
                nn.Conv2d(c, out, cfg.kernel_size, padding=pad) if cfg.conv == "conv"
                else LocallyConnected2d(c, out, cfg.kernel_size, (h, w), padding=pad),
                *([nn.BatchNorm2d(out)] if cfg.batch_norm else []),
                activation(cfg.activation),
                POOLS[cfg.pool](cfg.pool_size),
            ]
            c, h, w = out, h2, w2
        layers.append(nn.Flatten())
        size = c * h * w
        if cfg.hidden:
            layers += [projection(cfg.projection, size, cfg.hidden), activation(cfg.activation)]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            size = cfg.hidden
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)


register(ModelSpec("cnn", CNNConfig, CNN, "convolution + pooling stages, dense head"))

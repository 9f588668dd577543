"""Convolutional network: conv + pooling stages, then a dense head."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from models.base import Classifier, activation
from models.registry import ModelSpec, register

POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


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


class CNN(Classifier):
    def __init__(self, cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"cnn needs image input (channels, height, width), got shape {tuple(input_shape)}; "
                "set data.input_shape"
            )
        if cfg.pool not in POOLS:
            raise ValueError(f"unknown pool {cfg.pool!r} (known: {', '.join(POOLS)})")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for i, out in enumerate(cfg.channels):
            h2, w2 = h // cfg.pool_size, w // cfg.pool_size
            if h2 < 1 or w2 < 1:
                raise ValueError(
                    f"cnn stage {i + 1} of {len(cfg.channels)} would pool a {h}x{w} map "
                    f"by {cfg.pool_size}: too many stages for input {tuple(input_shape)}"
                )
            layers += [
                nn.Conv2d(c, out, cfg.kernel_size, padding=cfg.kernel_size // 2),
                *([nn.BatchNorm2d(out)] if cfg.batch_norm else []),
                activation(cfg.activation),
                POOLS[cfg.pool](cfg.pool_size),
            ]
            c, h, w = out, h2, w2
        layers.append(nn.Flatten())
        size = c * h * w
        if cfg.hidden:
            layers += [nn.Linear(size, cfg.hidden), activation(cfg.activation)]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            size = cfg.hidden
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


register(ModelSpec("cnn", CNNConfig, CNN, "convolution + pooling stages, dense head"))

"""A user's model with nothing but `forward`: raydeep trains it with cross-entropy.

    raydeep run --model examples.plain_mlp:PlainMLP --set model.init_args.width=128

`input_shape` and `num_classes` come from the data; `width` and `dropout` from the config.
Being an `nn.Sequential`, it can also be cut into pipeline stages (`--strategy pipeline`).
"""
from __future__ import annotations

import math

from torch import nn


class PlainMLP(nn.Sequential):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 256,
                 dropout: float = 0.0):
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, num_classes),
        )

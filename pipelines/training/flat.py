"""How a model's tensors are laid out over parameter-server shards.

All trainable parameters are viewed as one flat vector (in `named_parameters` order) and
cut into S contiguous ranges of nearly equal length, so the shards hold equal bytes and a
big tensor may span two shards. A push or a pull then moves one contiguous buffer per
shard, never a pickled state dict. Floating-point buffers (batch-norm running statistics)
are not trained by the optimizer; they travel as a second flat vector held by shard 0,
where the last worker to push wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ShardLayout:
    numel: int
    """Elements of all trainable parameters together."""
    bounds: tuple[tuple[int, int], ...]
    """[start, stop) of each shard's slice of the flat parameter vector."""
    buffer_numel: int
    """Elements of the floating-point buffers (held by shard 0)."""

    @classmethod
    def of(cls, model: nn.Module, shards: int) -> "ShardLayout":
        numel = sum(p.numel() for p in trainable(model))
        if not 1 <= shards <= numel:
            raise ValueError(f"cannot cut {numel:,} parameters into {shards} shards")
        edges = [round(i * numel / shards) for i in range(shards + 1)]
        return cls(numel, tuple(zip(edges[:-1], edges[1:])),
                   sum(b.numel() for b in float_buffers(model)))

    @property
    def shards(self) -> int:
        return len(self.bounds)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each shard's slice of a flat parameter-sized vector (views: contiguous already)."""
        return [flat[a:b] for a, b in self.bounds]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def float_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)])


def flat_gradients(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in trainable(model)])


def flat_buffers(model: nn.Module) -> torch.Tensor:
    buffers = float_buffers(model)
    if not buffers:
        return torch.zeros(0)
    return torch.cat([b.detach().reshape(-1) for b in buffers])


def load_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    unflatten_into(trainable(model), flat)


def load_buffers(model: nn.Module, flat: torch.Tensor) -> None:
    unflatten_into(float_buffers(model), flat)


@torch.no_grad()
def unflatten_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive slices of `flat` into `tensors`, in order."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def to_wire(tensor: torch.Tensor, dtype: str = "float32") -> np.ndarray:
    """A CPU buffer for Ray to ship: float32, or bfloat16 bits (half the bytes) carried as
    int16 because NumPy has no bfloat16."""
    tensor = tensor.detach().cpu()
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    return tensor.float().numpy()


def from_wire(buffer: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(buffer)
    if buffer.dtype == np.int16:
        return tensor.view(torch.bfloat16).float()
    return tensor

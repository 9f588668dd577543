"""Mixed precision (`optim.precision`): bf16 autocast on CPU and GPU, fp16 autocast with a
gradient scaler on GPU.

Autocast runs the matrix products of the forward pass (and of the loss) in the lower
precision while the weights, their gradients and the optimizer's state stay float32, so the
updates keep float32's resolution. bf16 keeps float32's exponent range and needs no scaling;
fp16's range is narrow enough that small gradients underflow, so its loss is scaled up
before backward and the gradients scaled back before the step (`torch.amp.GradScaler`,
which skips a step whose gradients overflowed and lowers the scale).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device | str):
    """The forward pass's precision: a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=DTYPES[precision])


class NoScaler:
    """GradScaler's interface for bf16 and fp32, which need no loss scaling."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass


def scaler(precision: str, device: torch.device | str):
    if precision == "fp16":
        return torch.amp.GradScaler(torch.device(device).type)
    return NoScaler()

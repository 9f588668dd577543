"""Training diagnostics: the gradient norm of each layer, to make vanishing gradients visible."""
from __future__ import annotations

import torch
from torch import nn

PREFIX = "grad_norm."


class GradNorms:
    """Mean gradient norm per layer over the steps of an epoch.

    A layer is a module with parameters of its own (a Linear's weight and bias, a Fastfood
    layer's three diagonals); its norm covers all of them. Norms stay on the device
    between steps and are read once per epoch.
    """

    def __init__(self, model: nn.Module):
        self.layers = [(name, [p for p in module.parameters(recurse=False) if p.requires_grad])
                       for name, module in model.named_modules()]
        self.layers = [(name, params) for name, params in self.layers if params]
        self.reset()

    def reset(self) -> None:
        self.sums: list[torch.Tensor] | None = None
        self.steps = 0

    def add(self) -> None:
        norms = [torch.stack([p.grad.detach().norm() if p.grad is not None
                              else torch.zeros((), device=p.device) for p in params]).norm()
                 for _, params in self.layers]
        self.sums = norms if self.sums is None else [a + b for a, b in zip(self.sums, norms)]
        self.steps += 1

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        values = torch.stack([s.float().cpu() for s in self.sums]) / self.steps
        result = {f"{PREFIX}{name}": float(v) for (name, _), v in zip(self.layers, values)}
        self.reset()
        return result

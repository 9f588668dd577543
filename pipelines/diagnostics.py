"""Training diagnostics: the gradient norm of each layer, to make vanishing gradients visible."""
from __future__ import annotations

import torch
from torch import nn

PREFIX = "grad_norm."


class GradNorms:
    """Mean gradient norm per layer weight over the steps of an epoch.

    Norms stay on the device between steps; they are read once per epoch.
    """

    def __init__(self, model: nn.Module):
        self.weights = [(name.removesuffix(".weight"), p) for name, p in model.named_parameters()
                        if name.endswith("weight") and p.requires_grad]
        self.reset()

    def reset(self) -> None:
        self.sums: list[torch.Tensor] | None = None
        self.steps = 0

    def add(self) -> None:
        norms = [p.grad.detach().norm() if p.grad is not None else torch.zeros((), device=p.device)
                 for _, p in self.weights]
        self.sums = norms if self.sums is None else [a + b for a, b in zip(self.sums, norms)]
        self.steps += 1

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        values = torch.stack([s.float().cpu() for s in self.sums]) / self.steps
        result = {f"{PREFIX}{name}": float(v) for (name, _), v in zip(self.weights, values)}
        self.reset()
        return result

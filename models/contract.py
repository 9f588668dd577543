"""What a user's own `nn.Module` must offer to be trained, smallest first.

- Nothing but ``forward(x) -> logits``: `x` is a batch of examples of the data's input
  shape, the logits have one column per class. raydeep trains it with cross-entropy and
  reports loss and accuracy. On a regression task (`data.task`), one output column: it
  is trained on the standardised target and reports MSE, RMSE, MAE and R² (`models.targets`).
- ``loss(batch) -> Tensor`` (optional): its own training objective for a batch
  ``(x, y)``, a scalar mean over the batch.
- ``evaluate(batch) -> dict[str, Tensor]`` (optional): its own metrics as per-example
  *sums* plus ``count``, the number of examples; every strategy adds them over batches and
  workers before dividing, so a mean would be averaged wrongly.
- ``pipeline_layers() -> list[nn.Module]`` (optional; an `nn.Sequential` has it already):
  layers whose composition is ``forward``, so that `pipeline` can cut it into stages; with
  it, ``output_loss(output, batch)`` if its loss is not cross-entropy on the last output.

`adapt` puts a module behind exactly the seams raydeep's own families offer
(it is a `models.base.Classifier`), so strategies never ask whose module they train.
"""
from __future__ import annotations

import torch
from torch import nn

from models.base import Classifier


class UserModel(Classifier):
    """A user's module with the methods it lacks filled in from the contract above: the
    objective, metrics and predictions of raydeep's own supervised families."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        own = getattr(self.module, "loss", None)
        return own(batch) if callable(own) else super().loss(batch)

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        own = getattr(self.module, "evaluate", None)
        if not callable(own):
            return super().evaluate(batch)
        sums = own(batch)
        if not isinstance(sums, dict) or "count" not in sums:
            raise ValueError(f"{type(self.module).__name__}.evaluate(batch) must return a dict of "
                             "per-example metric sums with 'count' (the number of examples)")
        return sums

    def unwrapped(self) -> nn.Module:
        """The user's own module, as logged to MLflow: loading it needs only the user's code."""
        return self.module


class CuttableUserModel(UserModel):
    """A user's module that lists its layers: `pipeline` can cut it into stages."""

    def pipeline_layers(self) -> list[nn.Module]:
        own = getattr(self.module, "pipeline_layers", None)
        return list(own()) if callable(own) else list(self.module)

    def output_loss(self, output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        own = getattr(self.module, "output_loss", None)
        return own(output, batch) if callable(own) else self.objective(output, batch[1])


def adapt(module: nn.Module) -> UserModel:
    """`module` behind raydeep's seams; it keeps its own methods where it has them."""
    cuttable = isinstance(module, nn.Sequential) or callable(getattr(module, "pipeline_layers", None))
    return (CuttableUserModel if cuttable else UserModel)(module)

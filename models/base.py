"""Pieces shared by the families: the classifier objective and activation lookup."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r} (known: {', '.join(sorted(ACTIVATIONS))})"
        ) from None


def classification_sums(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy and accuracy summed over the examples, with their count."""
    return {
        "loss": F.cross_entropy(logits, y, reduction="sum"),
        "accuracy": (logits.argmax(dim=1) == y).sum().to(logits.dtype),
        "count": torch.tensor(float(len(y)), device=logits.device),
    }


class Classifier(nn.Module):
    """A module whose ``forward(x)`` gives class logits; trained with cross-entropy."""

    task = "classification"

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y = batch
        return classification_sums(self(x), y)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(dim=1)


class SequentialClassifier(Classifier):
    """A classifier whose forward is ``self.net(x)``, an `nn.Sequential`: it can be cut into
    pipeline stages anywhere between its layers."""

    net: nn.Sequential

    def forward(self, x):
        return self.net(x)

    def pipeline_layers(self) -> list[nn.Module]:
        """The layers whose composition is `forward`, in order."""
        return list(self.net)

    def output_loss(self, output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The training loss from the last layer's output (what `loss` computes end to end)."""
        return F.cross_entropy(output, batch[1])


def flat_size(shape: tuple[int, ...]) -> int:
    size = 1
    for d in shape:
        size *= d
    return size


class Phase:
    """One greedy pre-training phase (a layer-wise autoencoder or RBM, say).

    `module` offers ``loss(batch)``; its parameters are exactly what the phase trains.
    Layers it reads but does not train (the frozen ones below) must be held outside its
    registered submodules, so that data-parallel wrappers see no unused parameters.
    """

    def __init__(self, name: str, module: nn.Module, epochs: int):
        self.name, self.module, self.epochs = name, module, epochs


class Frozen:
    """Holds modules a phase reads without training them, out of sight of `parameters()`."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            x = module(x)
        return x

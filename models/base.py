"""Pieces shared by the families: the supervised objective and activation lookup."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.targets import RegressionTarget

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
    """A supervised model: ``forward(x)`` gives class logits, trained with cross-entropy;
    or, once `regress` has set a target scale, one value per example, trained with squared
    error on the standardised target (`models.targets`)."""

    task = "classification"

    def regress(self, mean: float, std: float) -> None:
        """Train and predict a real-valued target of the training split's mean and scale."""
        self.targets = RegressionTarget(mean, std)
        self.task = "regression"

    def objective(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of the model's output for labels `y`."""
        return self.targets.loss(output, y) if self.task == "regression" else F.cross_entropy(output, y)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return self.objective(self(x), y)

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y = batch
        output = self(x)
        return self.targets.sums(output, y) if self.task == "regression" else classification_sums(output, y)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The class of each example, or its predicted target in the target's units."""
        output = self(x)
        return self.targets.predict(output) if self.task == "regression" else output.argmax(dim=1)


def regressing_families() -> list[str]:
    """The registered families whose models can regress (those built as a `Classifier`)."""
    from models.registry import get, names

    return [n for n in names() if isinstance(get(n).build, type) and issubclass(get(n).build, Classifier)]


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
        return self.objective(output, batch[1])


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

"""Autoencoders: plain, denoising, and stacked (greedy layer-wise pre-training, then a classifier).

- ``autoencoder``: an MLP encoder to a code, an MLP decoder back; trained to reconstruct
  its input. The loss is an example's reconstruction error summed over its features
  (squared error, or Bernoulli cross-entropy through a sigmoid output: nats), averaged
  over the batch; its scale suits the default SGD settings as well as Adam.
- ``dae``: the same, fed a corrupted input during training only (masking noise or additive
  Gaussian noise) and asked to reconstruct the clean input (Vincent et al., 2008).
- ``sae``: a stack of hidden layers, each first pre-trained greedily as the encoder of an
  autoencoder on the codes of the frozen layers below it, then the whole stack plus a
  softmax layer is fine-tuned as a classifier (Bengio et al., 2007).

Every reconstruction model reports ``recon_error``: the mean squared error over an
example's features, whatever its training loss, so the families compare on one scale
(and with the error of predicting the mean image). ``loss`` in the metrics is the
training objective on clean inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Classifier, Frozen, Phase, activation, flat_size
from models.registry import ModelSpec, register

RECONS = ("mse", "bce")
CORRUPTIONS = ("mask", "gaussian")


# --- pieces shared with models.vae -------------------------------------------------------

def mlp(sizes: Sequence[int], act: str, last_activation: bool = False) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, an activation after each but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def check_sizes(family: str, key: str, sizes: Sequence[int]) -> None:
    if any(s < 1 for s in sizes):
        raise ValueError(f"{family} {key} must hold positive sizes, got {list(sizes)}")


def is_image(shape: Sequence[int]) -> bool:
    """(H, W) or (C, H, W): the shapes `pipelines.figures.image_grid` can draw."""
    return len(shape) in (2, 3)


def side_by_side(inputs: torch.Tensor, outputs: torch.Tensor, columns: int = 10) -> torch.Tensor:
    """Rows of `columns` inputs, each row followed by the row of their reconstructions."""
    inputs = inputs.detach().cpu().float().clamp(0, 1)
    outputs = outputs.detach().cpu().float().clamp(0, 1)
    if inputs.dim() == 4:
        inputs, outputs = inputs[:, 0], outputs[:, 0]
    columns = min(columns, len(inputs))
    short = -len(inputs) % columns  # blank cells complete the last row
    if short:
        blank = torch.zeros(short, *inputs.shape[1:])
        inputs, outputs = torch.cat([inputs, blank]), torch.cat([outputs, blank])
    rows = []
    for start in range(0, len(inputs), columns):
        rows += [inputs[start:start + columns], outputs[start:start + columns]]
    return torch.cat(rows)


def corrupt(x: torch.Tensor, kind: str, level: float) -> torch.Tensor:
    """Masking noise (zero each feature with probability `level`) or Gaussian noise (std `level`)."""
    if level == 0:
        return x
    if kind == "mask":
        return x * (torch.rand_like(x) >= level).to(x.dtype)
    return x + level * torch.randn_like(x)


def check_corruption(family: str, kind: str, level: float) -> None:
    if kind not in CORRUPTIONS:
        raise ValueError(f"{family} corruption must be one of {', '.join(CORRUPTIONS)}, got {kind!r}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"{family} corruption level must be in [0, 1], got {level}")


# --- autoencoder and dae ------------------------------------------------------------------

@dataclass
class AutoencoderConfig:
    hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden layers of the encoder, input side first; the decoder mirrors them."""
    code: int = 16
    """Size of the code (the bottleneck layer, linear)."""
    activation: str = "relu"
    """relu, sigmoid, tanh, gelu or elu, after every hidden layer."""
    recon: str = "mse"
    """Reconstruction loss: mse (squared error, linear output) or bce (Bernoulli cross-entropy, sigmoid output; inputs in [0, 1])."""


@dataclass
class DAEConfig(AutoencoderConfig):
    corruption: str = "mask"
    """Training-time corruption of the input: mask (zero a random fraction) or gaussian (add noise)."""
    corruption_level: float = 0.3
    """Fraction of features zeroed (mask) or the noise's standard deviation (gaussian), in [0, 1]."""


class Autoencoder(nn.Module):
    """Encoder MLP -> linear code -> decoder MLP; ``forward`` gives the reconstruction."""

    task = "reconstruction"
    family = "autoencoder"

    def __init__(self, cfg: AutoencoderConfig, input_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        check_sizes(self.family, "hidden", cfg.hidden)
        check_sizes(self.family, "code", [cfg.code])
        if cfg.recon not in RECONS:
            raise ValueError(f"{self.family} recon must be one of {', '.join(RECONS)}, got {cfg.recon!r}")
        self.input_shape = tuple(input_shape)
        self.recon = cfg.recon
        size = flat_size(self.input_shape)
        sizes = [size, *cfg.hidden, cfg.code]
        self.encoder = nn.Sequential(nn.Flatten(), mlp(sizes, cfg.activation))
        self.decoder = mlp(sizes[::-1], cfg.activation)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def _decode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Flat decoder output: the reconstruction (mse) or its logits (bce)."""
        return self.decoder(self.encode(x))

    def _output(self, raw: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(raw) if self.recon == "bce" else raw
        return out.reshape(len(out), *self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(self._decode_raw(x))

    def pipeline_layers(self) -> list[nn.Module]:
        """Encoder then decoder, layer by layer: the composition is `_decode_raw`."""
        flatten, encoder = self.encoder
        return [flatten, *encoder, *self.decoder]

    def output_loss(self, raw: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`loss` from the decoder's raw output; the target is the clean input."""
        return self._per_example_loss(raw, batch[0]).mean()

    def _per_example_loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.reshape(len(target), -1)
        if self.recon == "bce":
            per_feature = F.binary_cross_entropy_with_logits(raw, target, reduction="none")
        else:
            per_feature = (raw - target) ** 2
        return per_feature.sum(dim=1)

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder sees in training: the input itself (a dae corrupts it)."""
        return x

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = batch[0]
        source = self.training_input(x) if self.training else x
        return self._per_example_loss(self._decode_raw(source), x).mean()

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x = batch[0]
        raw = self._decode_raw(x)  # clean input, whatever the training corruption
        recon = self._output(raw).reshape(len(x), -1)
        return {
            "loss": self._per_example_loss(raw, x).sum(),
            "recon_error": ((recon - x.reshape(len(x), -1)) ** 2).mean(dim=1).sum(),
            "count": torch.tensor(float(len(x)), device=x.device),
        }

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not is_image(self.input_shape):
            return {}
        return {"reconstructions": side_by_side(x, self(x))}


class DenoisingAutoencoder(Autoencoder):
    """An autoencoder that reconstructs the clean input from a corrupted one (training only)."""

    family = "dae"

    def __init__(self, cfg: DAEConfig, input_shape: tuple[int, ...], num_classes: int = 0):
        check_corruption(self.family, cfg.corruption, cfg.corruption_level)
        super().__init__(cfg, input_shape, num_classes)
        self.corruption, self.corruption_level = cfg.corruption, cfg.corruption_level

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        return corrupt(x, self.corruption, self.corruption_level)


# --- stacked autoencoder ------------------------------------------------------------------

@dataclass
class SAEConfig:
    layers: list[int] = field(default_factory=lambda: [512, 256])
    """Hidden layers of the stack, input side first; each is pre-trained as an autoencoder."""
    activation: str = "relu"
    """relu, sigmoid, tanh, gelu or elu, after every hidden layer."""
    pretrain_epochs: int = 10
    """Greedy pre-training epochs per layer (0: no pre-training, plain supervised training)."""
    corruption_level: float = 0.0
    """Masking noise on each layer's input during its pre-training (> 0: a stacked denoising autoencoder), in [0, 1]."""
    dropout: float = 0.0
    """Dropout probability after each hidden layer during fine-tuning (not in pre-training)."""


class LayerAutoencoder(nn.Module):
    """One pre-training phase: reconstruct the frozen layers' code through one new layer.

    Its registered parameters are exactly the layer being trained (shared with the stack)
    and a throw-away linear decoder; the layers below are read through `Frozen`.
    """

    def __init__(self, below: Frozen, layer: nn.Module, decoder: nn.Module, corruption_level: float):
        super().__init__()
        self.below = below  # a plain object: not a submodule, its parameters are not trained
        self.layer, self.decoder = layer, decoder
        self.corruption_level = corruption_level

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        target = self.below(batch[0])
        source = corrupt(target, "mask", self.corruption_level) if self.training else target
        return ((self.decoder(self.layer(source)) - target) ** 2).sum(dim=1).mean()


class StackedAutoencoder(Classifier):
    """A deep classifier whose hidden layers are first pre-trained as autoencoders."""

    def __init__(self, cfg: SAEConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if not cfg.layers:
            raise ValueError("sae needs at least one hidden layer, got layers=[]")
        check_sizes("sae", "layers", cfg.layers)
        if cfg.pretrain_epochs < 0:
            raise ValueError(f"sae pretrain_epochs must be >= 0, got {cfg.pretrain_epochs}")
        check_corruption("sae", "mask", cfg.corruption_level)
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"sae dropout must be in [0, 1), got {cfg.dropout}")
        self.pretrain_epochs, self.corruption_level = cfg.pretrain_epochs, cfg.corruption_level
        self.flatten = nn.Flatten()
        sizes = [flat_size(input_shape), *cfg.layers]
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), activation(cfg.activation)) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(sizes[-1], num_classes)
        self.dropout = nn.Dropout(cfg.dropout)
        self._sizes = sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.flatten(x)
        for layer in self.hidden:
            h = self.dropout(layer(h))
        return self.head(h)

    def pretrain_phases(self) -> list[Phase]:
        if self.pretrain_epochs == 0:
            return []
        device = self.head.weight.device
        phases = []
        for i, layer in enumerate(self.hidden):
            decoder = nn.Linear(self._sizes[i + 1], self._sizes[i]).to(device)
            below = Frozen(self.flatten, *self.hidden[:i])
            phases.append(Phase(f"layer{i + 1}",
                                LayerAutoencoder(below, layer, decoder, self.corruption_level),
                                self.pretrain_epochs))
        return phases


register(ModelSpec("autoencoder", AutoencoderConfig, Autoencoder,
                   "MLP autoencoder (reconstruction; mse or Bernoulli cross-entropy)"))
register(ModelSpec("dae", DAEConfig, DenoisingAutoencoder,
                   "denoising autoencoder (masking or Gaussian corruption in training)"))
register(ModelSpec("sae", SAEConfig, StackedAutoencoder,
                   "stacked autoencoder: greedy layer-wise pre-training, then a supervised classifier"))

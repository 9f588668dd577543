"""Restricted Boltzmann machines and deep belief networks (the course's energy-based models).

- ``rbm``: a Bernoulli–Bernoulli RBM with energy ``E(v, h) = -vᵀWh - bᵀv - dᵀh``, trained
  by contrastive divergence (CD-k) or persistent contrastive divergence (PCD).
- ``dbn``: RBMs stacked and pre-trained greedily, each on the mean-field hidden activations
  of the frozen RBMs below it; their weights then initialise a sigmoid network (the DBN's
  up-pass) plus a softmax layer, fine-tuned by backpropagation (Hinton et al., 2006).

Contrastive divergence as a loss. Every strategy trains a model through ``loss(batch)``
and the gradient of that loss, so CD is written as the difference of free energies

    loss = mean F(v_data) - mean F(v_negative.detach()),
    F(v) = -bᵀv - Σ_j softplus(d_j + (vᵀW)_j)

whose gradient with respect to (W, b, d) is exactly minus the CD estimate of the
log-likelihood gradient, e.g. ``<v p(h|v)ᵀ>_model - <v p(h|v)ᵀ>_data`` for W. The negative
samples come from k Gibbs steps started at the batch (CD-k) or from persistent chains
kept in a buffer and advanced k steps per update (PCD). The loss value itself is not a
likelihood; watch ``val_pseudo_likelihood`` and ``val_recon_error`` instead.

The PCD chains are a buffer (``chains``), so they are checkpointed with the weights. Under
DDP, which broadcasts buffers from rank 0 before each forward, every worker starts a step
from rank 0's chains and advances them with its own random draws.

W and the hidden biases d are held in an ``nn.Linear(visible, hidden)`` (its ``weight`` is
Wᵀ, its ``bias`` is d), the RBM's first module with parameters, so the run draws each
hidden unit's weights as the automatic ``first_layer_filters.png`` when the input is a
single-channel image such as digits' 8x8; b lives in a `VisibleBias` module after it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Classifier, Frozen, Phase, flat_size
from models.registry import ModelSpec, register

EVAL_SEED = 0
"""Seed of the generator that picks the flipped bit of the pseudo-likelihood in `evaluate`."""
PICTURE_SEED = 0
PICTURE_GIBBS_STEPS = 1000
"""Gibbs steps from random starts behind the ``gibbs_samples`` picture."""
PICTURE_CHAINS = 20


@dataclass
class RBMConfig:
    hidden: int = 64
    """Hidden (binary) units."""
    cd_k: int = 1
    """Gibbs steps per update: CD-k from the batch, or k steps of the persistent chains (PCD)."""
    persistent: bool = False
    """Persistent contrastive divergence: the negative samples come from chains kept between updates."""
    chains: int = 100
    """Number of persistent chains (the negative sample of each PCD update); used when persistent."""


def rbm_linear(visible: int, hidden: int) -> nn.Linear:
    """The weights W (as Wᵀ) and hidden biases d of an RBM: small Gaussian weights, zero biases."""
    linear = nn.Linear(visible, hidden)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01)
        linear.bias.zero_()
    return linear


class RBM(nn.Module):
    """Bernoulli–Bernoulli RBM, ``E(v, h) = -vᵀWh - bᵀv - dᵀh``.

    Inputs are binarized deterministically (``x > 0.5``) for training, for the metrics and
    for ``forward``: the model is a distribution over binary vectors. (`binarize=False`, as
    used by the DBN's layers, takes inputs in [0, 1] as they are: Bernoulli means.)

    ``forward(x)`` gives the hidden probabilities p(h = 1 | v). ``evaluate`` reports, per
    example (summed over the batch):

    - ``recon_error``: one mean-field up-down pass v -> p(h|v) -> p(v|h), squared error
      averaged over the features (the autoencoders' scale);
    - ``pseudo_likelihood``: the stochastic estimator of scikit-learn's
      ``BernoulliRBM.score_samples``, ``n_features * log sigmoid(F(v_flipped) - F(v))``
      with one random bit flipped per example; the bits come from a generator seeded with
      `EVAL_SEED` on every call, so the metric is deterministic.

    `below` (a `Frozen`) maps the input to this RBM's visible units: the frozen layers
    under an RBM of a DBN; `linear` shares W and d with another module (the DBN's layer).
    """

    task = "generative"

    def __init__(self, visible: int, hidden: int, cd_k: int = 1, persistent: bool = False,
                 chains: int = 100, *, binarize: bool = True, linear: nn.Linear | None = None,
                 below: Frozen | None = None, input_shape: Sequence[int] | None = None,
                 family: str = "rbm"):
        super().__init__()
        check_rbm(family, hidden, cd_k)
        if persistent and chains < 1:
            raise ValueError(f"{family} chains must be >= 1, got {chains}")
        if visible < 1:
            raise ValueError(f"{family} needs at least one visible unit, got {visible}")
        self.linear = linear if linear is not None else rbm_linear(visible, hidden)
        weight = self.linear.weight
        self.visible_units = VisibleBias(visible, weight)
        self.cd_k, self.persistent, self.binarize = cd_k, persistent, binarize
        self.below = below
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if persistent:
            self.register_buffer(
                "chains", torch.bernoulli(torch.full((chains, visible), 0.5, dtype=weight.dtype)).to(weight.device))

    @property
    def visible_bias(self) -> nn.Parameter:
        """b, the visible biases."""
        return self.visible_units.bias

    # --- the energy model -------------------------------------------------------------

    def visible(self, x: torch.Tensor) -> torch.Tensor:
        """The visible units of a batch: flattened, through the frozen layers below, binarized."""
        v = x.flatten(1)
        if self.below is not None:
            v = self.below(v)
        if self.binarize:
            v = (v > 0.5).to(self.linear.weight.dtype)
        return v

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        """p(h_j = 1 | v) = sigmoid(d_j + (vᵀW)_j)."""
        return torch.sigmoid(self.linear(v))

    def visible_probs(self, h: torch.Tensor) -> torch.Tensor:
        """p(v_i = 1 | h) = sigmoid(b_i + (Wh)_i)."""
        return torch.sigmoid(h @ self.linear.weight + self.visible_bias)

    def energy(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """E(v, h) = -vᵀWh - bᵀv - dᵀh, one value per example."""
        return -(self.linear(v) * h).sum(dim=1) - v @ self.visible_bias

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = -log Σ_h exp(-E(v, h)) = -bᵀv - Σ_j softplus(d_j + (vᵀW)_j), per example."""
        return -v @ self.visible_bias - F.softplus(self.linear(v)).sum(dim=1)

    @torch.no_grad()
    def gibbs(self, v: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`steps` rounds of block Gibbs sampling v -> h -> v; returns the last binary v."""
        for _ in range(steps):
            h = torch.bernoulli(self.hidden_probs(v), generator=generator)
            v = torch.bernoulli(self.visible_probs(h), generator=generator)
        return v

    @torch.no_grad()
    def negative_samples(self, v: torch.Tensor) -> torch.Tensor:
        """The model's samples for the negative phase: CD-k from `v`, or the advanced PCD chains."""
        if self.persistent:
            self.chains.copy_(self.gibbs(self.chains, self.cd_k))
            return self.chains.clone()
        return self.gibbs(v, self.cd_k)

    # --- the model contract ----------------------------------------------------------------

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Free-energy difference whose gradient is the contrastive-divergence gradient."""
        v = self.visible(batch[0])
        negative = self.negative_samples(v)
        return self.free_energy(v).mean() - self.free_energy(negative.detach()).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden_probs(self.visible(x))

    def pseudo_likelihood(self, v: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Per-example ``n_features * log sigmoid(F(v with bit flip[n] flipped) - F(v))``."""
        rows = torch.arange(len(v), device=v.device)
        flipped = v.clone()
        flipped[rows, flip] = 1 - flipped[rows, flip]
        return v.shape[1] * F.logsigmoid(self.free_energy(flipped) - self.free_energy(v))

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        v = self.visible(batch[0])
        recon = self.visible_probs(self.hidden_probs(v))
        generator = torch.Generator().manual_seed(EVAL_SEED)
        flip = torch.randint(v.shape[1], (len(v),), generator=generator).to(v.device)
        return {
            "recon_error": ((recon - v) ** 2).mean(dim=1).sum(),
            "pseudo_likelihood": self.pseudo_likelihood(v, flip).sum(),
            "count": torch.tensor(float(len(v)), device=v.device),
        }

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``gibbs_samples``: p(v|h) after many Gibbs steps from random starts (fixed seed);
        ``reconstructions``: rows of binarized inputs, each above their mean-field reconstructions."""
        shape = _image_shape(self.input_shape, self.visible_bias.numel())
        if shape is None:
            return {}
        device = self.linear.weight.device
        generator = torch.Generator(device=device).manual_seed(PICTURE_SEED)
        start = torch.bernoulli(
            torch.full((PICTURE_CHAINS, self.visible_bias.numel()), 0.5, device=device,
                       dtype=self.linear.weight.dtype), generator=generator)
        v = self.gibbs(start, PICTURE_GIBBS_STEPS - 1, generator)
        h = torch.bernoulli(self.hidden_probs(v), generator=generator)
        samples = self.visible_probs(h)
        inputs = self.visible(x)
        recon = self.visible_probs(self.hidden_probs(inputs))
        return {"gibbs_samples": samples.reshape(-1, *shape),
                "reconstructions": _rows_above(inputs, recon).reshape(-1, *shape)}


class VisibleBias(nn.Module):
    """The visible biases b, in a module of their own registered after the `nn.Linear` of W:
    the run's figures take the first module holding parameters as the first layer."""

    def __init__(self, visible: int, like: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(visible, device=like.device, dtype=like.dtype))


def _image_shape(input_shape: tuple[int, ...] | None, features: int) -> tuple[int, int] | None:
    """(H, W) when the input is a single-channel image of `features` pixels, else None."""
    if input_shape is None or len(input_shape) not in (2, 3):
        return None
    if len(input_shape) == 3 and input_shape[0] != 1:
        return None
    height, width = input_shape[-2], input_shape[-1]
    return (height, width) if height * width == features else None


def _rows_above(inputs: torch.Tensor, outputs: torch.Tensor, columns: int = 10) -> torch.Tensor:
    """Rows of `columns` inputs, each followed by the row of their outputs (blanks complete a row)."""
    short = -len(inputs) % columns
    if short:
        blank = inputs.new_zeros(short, inputs.shape[1])
        inputs, outputs = torch.cat([inputs, blank]), torch.cat([outputs, blank])
    rows = []
    for start in range(0, len(inputs), columns):
        rows += [inputs[start:start + columns], outputs[start:start + columns]]
    return torch.cat(rows)


def check_rbm(family: str, hidden: int, cd_k: int) -> None:
    if hidden < 1:
        raise ValueError(f"{family} hidden must be >= 1, got {hidden}")
    if cd_k < 1:
        raise ValueError(f"{family} cd_k must be >= 1, got {cd_k}")


def build_rbm(cfg: RBMConfig, input_shape: tuple[int, ...], num_classes: int = 0) -> RBM:
    return RBM(flat_size(input_shape), cfg.hidden, cfg.cd_k, cfg.persistent, cfg.chains,
               input_shape=input_shape)


# --- dbn --------------------------------------------------------------------------------

@dataclass
class DBNConfig:
    layers: list[int] = field(default_factory=lambda: [512, 256])
    """Hidden units of each stacked RBM, input side first; each becomes a sigmoid layer."""
    pretrain_epochs: int = 10
    """Epochs of greedy CD pre-training per RBM (0: no pre-training, a plain sigmoid DNN)."""
    cd_k: int = 1
    """Gibbs steps of the contrastive divergence that pre-trains each RBM."""
    dropout: float = 0.0
    """Dropout on each hidden layer's activations while fine-tuning (Hinton et al. 2012 fine-tuned
    pre-trained nets with it); pre-training never sees it."""


class DBN(Classifier):
    """Stacked RBMs pre-trained greedily, unrolled into a sigmoid network plus softmax layer.

    The network's layers *are* the RBMs' W and hidden biases (shared `nn.Linear`s); the
    RBMs' visible biases live only in the pre-training phases, which `pretrain_phases()`
    builds, so the classifier has no parameter that fine-tuning leaves unused. RBM i sees
    the mean-field activations of the frozen layers below it (`Frozen`); the first sees the
    input's values in [0, 1] as Bernoulli means (not binarized), as the network does.
    The layers start from PyTorch's default `nn.Linear` initialisation (not the rbm
    family's N(0, 0.01)), so that `pretrain_epochs: 0` is an ordinary sigmoid network.
    """

    def __init__(self, cfg: DBNConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if not cfg.layers:
            raise ValueError("dbn layers must name at least one RBM, got []")
        if any(width < 1 for width in cfg.layers):
            raise ValueError(f"dbn layers must hold positive sizes, got {list(cfg.layers)}")
        if cfg.pretrain_epochs < 0:
            raise ValueError(f"dbn pretrain_epochs must be >= 0, got {cfg.pretrain_epochs}")
        if cfg.cd_k < 1:
            raise ValueError(f"dbn cd_k must be >= 1, got {cfg.cd_k}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dbn dropout must be in [0, 1), got {cfg.dropout}")
        self.pretrain_epochs, self.cd_k, self.dropout = cfg.pretrain_epochs, cfg.cd_k, cfg.dropout
        size = flat_size(input_shape)
        self.layers = nn.ModuleList()
        for width in cfg.layers:
            self.layers.append(nn.Linear(size, width))
            size = width
        self.head = nn.Linear(size, num_classes)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """The DBN's up-pass: mean-field activations of the top hidden layer (dropped out
        while training, where `dropout` says)."""
        h = x.flatten(1)
        for layer in self.layers:
            h = F.dropout(torch.sigmoid(layer(h)), self.dropout, self.training)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(x))

    def pretrain_phases(self) -> list[Phase]:
        if self.pretrain_epochs == 0:
            return []
        phases = []
        for i, layer in enumerate(self.layers):
            below = Frozen(*[m for lower in self.layers[:i] for m in (lower, nn.Sigmoid())])
            rbm = RBM(layer.in_features, layer.out_features, self.cd_k, binarize=False,
                      linear=layer, below=below, family="dbn")
            phases.append(Phase(f"rbm{i + 1}", rbm, self.pretrain_epochs))
        return phases


register(ModelSpec("rbm", RBMConfig, build_rbm,
                   "Bernoulli-Bernoulli RBM, CD-k or persistent CD (binarized inputs)"))
register(ModelSpec("dbn", DBNConfig, DBN,
                   "deep belief network: stacked RBMs pre-trained greedily, fine-tuned as a sigmoid DNN"))

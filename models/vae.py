"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", 2014).

A Gaussian encoder q(z|x) = N(mu(x), diag sigma^2(x)), a standard normal prior p(z) and a
Bernoulli decoder p(x|z), trained by SGVB: one reparameterised sample z = mu + sigma * eps
per example gives an unbiased estimate of the evidence lower bound (ELBO)

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))   <=   log p(x),

whose KL term is computed in closed form. The loss is the negative ELBO per example.

The Bernoulli likelihood needs binary data: the model binarises its input
deterministically, x > 0.5, in training, evaluation and `forward` alike, so the ELBO is in
nats per example of the binarised data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.autoencoder import check_sizes, is_image, mlp, side_by_side
from models.base import flat_size
from models.registry import ModelSpec, register


@dataclass
class VAEConfig:
    hidden: list[int] = field(default_factory=lambda: [128])
    """Hidden layers of the encoder, input side first; the decoder mirrors them."""
    latent: int = 8
    """Dimension of the latent code z."""
    activation: str = "relu"
    """relu, sigmoid, tanh, gelu or elu, after every hidden layer."""
    eval_samples: int = 10
    """Samples of z per example when evaluating the ELBO (drawn from a fixed-seed generator)."""


class VAE(nn.Module):
    """Gaussian encoder, Bernoulli decoder; ``forward`` gives p(x|z = mu(x)), the mean reconstruction."""

    task = "generative"

    def __init__(self, cfg: VAEConfig, input_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        check_sizes("vae", "hidden", cfg.hidden)
        check_sizes("vae", "latent", [cfg.latent])
        if cfg.eval_samples < 1:
            raise ValueError(f"vae eval_samples must be >= 1, got {cfg.eval_samples}")
        self.input_shape = tuple(input_shape)
        self.latent, self.eval_samples = cfg.latent, cfg.eval_samples
        size = flat_size(self.input_shape)
        self.encoder = nn.Sequential(nn.Flatten(), mlp([size, *cfg.hidden], cfg.activation, True))
        last = cfg.hidden[-1] if cfg.hidden else size
        self.mu = nn.Linear(last, cfg.latent)
        self.logvar = nn.Linear(last, cfg.latent)
        self.decoder = mlp([cfg.latent, *cfg.hidden[::-1], size], cfg.activation)

    @staticmethod
    def binarize(x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).to(x.dtype if x.is_floating_point() else torch.get_default_dtype())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x), for binarised `x`."""
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli means p(x|z), shaped like the input."""
        return torch.sigmoid(self.decoder(z)).reshape(len(z), *self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(self.binarize(x))
        return self.decode(mu)

    def elbo(self, x: torch.Tensor, samples: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example ELBO (nats) of binarised `x`, its expectation estimated from `samples` draws."""
        flat = x.reshape(len(x), -1)
        mu, logvar = self.encode(x)
        eps = torch.randn((samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps  # (samples, N, latent)
        logits = self.decoder(z.reshape(-1, self.latent)).reshape(samples, len(x), -1)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, flat.expand_as(logits), reduction="none").sum(dim=2).mean(dim=0)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return log_px - kl

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return -self.elbo(self.binarize(batch[0])).mean()

    # --- as pipeline stages: the code's mean and log-variance ride along with the activations

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.binarize(x)

    def pipeline_layers(self) -> list[nn.Module]:
        """Encoder layers, the Gaussian heads, the reparameterised draw, then the decoder
        layers; from the heads on, each activation carries [.., mu, logvar] for the KL term."""
        flatten, encoder = self.encoder
        carried = 2 * self.latent
        return [flatten, *encoder, GaussianHeads(self.mu, self.logvar), Reparameterize(self.latent),
                *(Carry(layer, carried) for layer in self.decoder)]

    def output_loss(self, output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Negative ELBO (one draw) from the decoder's logits and the carried mu, logvar."""
        logits, mu, logvar = output[:, :-2 * self.latent], *output[:, -2 * self.latent:].chunk(2, dim=1)
        flat = self.binarize(batch[0]).reshape(len(output), -1)
        log_px = -F.binary_cross_entropy_with_logits(logits, flat, reduction="none").sum(dim=1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return -(log_px - kl).mean()

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x = self.binarize(batch[0])
        generator = torch.Generator(device=x.device).manual_seed(0)  # the same estimate every time
        elbo = self.elbo(x, self.eval_samples, generator)
        recon = self(x).reshape(len(x), -1)
        return {
            "loss": -elbo.sum(),
            "elbo": elbo.sum(),
            "recon_error": ((recon - x.reshape(len(x), -1)) ** 2).mean(dim=1).sum(),
            "count": torch.tensor(float(len(x)), device=x.device),
        }

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """Bernoulli means of `n` codes drawn from the prior (fixed seed)."""
        device = self.mu.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn((n, self.latent), generator=generator, device=device)
        return self.decode(z)

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not is_image(self.input_shape):
            return {}
        binary = self.binarize(x)
        return {"samples": self.sample(len(x)), "reconstructions": side_by_side(binary, self(binary))}


class GaussianHeads(nn.Module):
    def __init__(self, mu: nn.Linear, logvar: nn.Linear):
        super().__init__()
        self.mu, self.logvar = mu, logvar

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mu(h), self.logvar(h)], dim=1)


class Reparameterize(nn.Module):
    """[mu, logvar] -> [z, mu, logvar] with z = mu + exp(logvar / 2) * eps."""

    def __init__(self, latent: int):
        super().__init__()
        self.latent = latent

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        mu, logvar = stats.chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return torch.cat([z, stats], dim=1)


class Carry(nn.Module):
    """Applies `layer` to an activation's leading columns and passes the last `carried` on."""

    def __init__(self, layer: nn.Module, carried: int):
        super().__init__()
        self.layer, self.carried = layer, carried

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layer(x[:, :-self.carried]), x[:, -self.carried:]], dim=1)


register(ModelSpec("vae", VAEConfig, VAE,
                   "variational autoencoder (Gaussian encoder, Bernoulli decoder on binarised input, SGVB)"))


# --- semi-supervised: the M2 model ---------------------------------------------------------

@dataclass
class SSVAEConfig:
    hidden: list[int] = field(default_factory=lambda: [256])
    """Hidden layers of the classifier q(y|x) and the encoder q(z|x,y); the decoder mirrors them."""
    latent: int = 8
    """Dimension of the latent code z (the style left once the class is known)."""
    activation: str = "relu"
    """relu, sigmoid, tanh, gelu or elu, after every hidden layer."""
    labelled_fraction: float = 0.1
    """Fraction of training examples whose label is used, in [0, 1]; the rest are unlabelled.
    Which ones is fixed by a hash of each example's pixels, the same in every epoch and worker."""
    alpha: float = 50.0
    """Weight of the classifier's cross-entropy on labelled examples (Kingma et al.'s alpha, per example)."""
    eval_samples: int = 10
    """Samples of z per example and class when evaluating the ELBO (fixed-seed generator)."""


class SemiSupervisedVAE(nn.Module):
    """M2 of Kingma, Rezende, Mohamed & Welling, "Semi-supervised learning with deep generative models" (2014).

    The class y is a latent variable of the generative model p(x|y,z) p(y) p(z) (uniform
    p(y), standard normal p(z), Bernoulli decoder on binarised x). For a labelled example
    the loss is the negative ELBO of (x, y) plus `alpha` times the classifier's
    cross-entropy; for an unlabelled one, y is summed out under q(y|x):
    U(x) = sum_y q(y|x) L(x, y) - H(q(y|x)). ``forward`` gives the classifier's logits.
    Metrics: the classifier's loss and accuracy, and ``elbo`` = -U(x), a bound on log p(x).
    """

    task = "classification"
    HASH_MODULUS = 1_000_003

    def __init__(self, cfg: SSVAEConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        check_sizes("ssvae", "hidden", cfg.hidden)
        check_sizes("ssvae", "latent", [cfg.latent])
        if not 0.0 <= cfg.labelled_fraction <= 1.0:
            raise ValueError(f"ssvae labelled_fraction must be in [0, 1], got {cfg.labelled_fraction}")
        if cfg.alpha < 0:
            raise ValueError(f"ssvae alpha must be >= 0, got {cfg.alpha}")
        if cfg.eval_samples < 1:
            raise ValueError(f"ssvae eval_samples must be >= 1, got {cfg.eval_samples}")
        if num_classes < 2:
            raise ValueError(f"ssvae needs at least 2 classes, got {num_classes}")
        self.input_shape = tuple(input_shape)
        self.classes, self.latent = num_classes, cfg.latent
        self.labelled_fraction, self.alpha, self.eval_samples = (
            cfg.labelled_fraction, cfg.alpha, cfg.eval_samples)
        size = flat_size(self.input_shape)
        self.classifier = nn.Sequential(nn.Flatten(), mlp([size, *cfg.hidden, num_classes], cfg.activation))
        self.encoder = mlp([size + num_classes, *cfg.hidden], cfg.activation, True)
        last = cfg.hidden[-1] if cfg.hidden else size + num_classes
        self.mu = nn.Linear(last, cfg.latent)
        self.logvar = nn.Linear(last, cfg.latent)
        self.decoder = mlp([cfg.latent + num_classes, *cfg.hidden[::-1], size], cfg.activation)
        weights = torch.randint(1, 2 ** 20, (size,), generator=torch.Generator().manual_seed(1234))
        self.register_buffer("hash_weights", weights, persistent=False)

    binarize = staticmethod(VAE.binarize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)  # q(y|x) may read the grey levels: any q(y|x) gives a valid bound

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(dim=1)

    def labelled(self, x: torch.Tensor) -> torch.Tensor:
        """Whether each example's label is used: an exact integer hash of its pixels."""
        if self.labelled_fraction >= 1:
            return torch.ones(len(x), dtype=torch.bool, device=x.device)
        levels = torch.round(x.reshape(len(x), -1).clamp(0, 1) * 255).long()
        key = (levels * self.hash_weights).sum(dim=1) % self.HASH_MODULUS
        return key < int(self.labelled_fraction * self.HASH_MODULUS)

    def _neg_elbo_per_class(self, x: torch.Tensor, samples: int = 1,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """L(x, y) for every class y: (N, classes), nats; `x` binarised and flat."""
        n, k = len(x), self.classes
        onehot = torch.eye(k, device=x.device, dtype=x.dtype).repeat_interleave(n, dim=0)  # (k*n, k)
        xs = x.repeat(k, 1)  # class-major: row c*n + i is example i with class c
        h = self.encoder(torch.cat([xs, onehot], dim=1))
        mu, logvar = self.mu(h), self.logvar(h)
        eps = torch.randn((samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.decoder(torch.cat([z, onehot.expand(samples, -1, -1)], dim=2))
        log_px = -F.binary_cross_entropy_with_logits(
            logits, xs.expand_as(logits), reduction="none").sum(dim=2).mean(dim=0)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        log_py = -torch.log(torch.tensor(float(k), device=x.device))
        return (kl - log_px - log_py).reshape(k, n).t()

    @staticmethod
    def _unlabelled(neg_elbo: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """U(x) = sum_y q(y|x) L(x, y) - H(q(y|x))."""
        log_q = F.log_softmax(logits, dim=1)
        return (log_q.exp() * (neg_elbo + log_q)).sum(dim=1)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        logits = self.classifier(x)
        labelled = self.labelled(x)
        neg_elbo = self._neg_elbo_per_class(self.binarize(x).reshape(len(x), -1))
        supervised = (neg_elbo.gather(1, y.long().clamp(0, self.classes - 1)[:, None])[:, 0]
                      + self.alpha * F.cross_entropy(logits, y.long().clamp(0, self.classes - 1),
                                                     reduction="none"))
        unsupervised = self._unlabelled(neg_elbo, logits)
        return torch.where(labelled, supervised, unsupervised).mean()

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.classifier(x)
        generator = torch.Generator(device=x.device).manual_seed(0)
        neg_elbo = self._neg_elbo_per_class(self.binarize(x).reshape(len(x), -1), self.eval_samples,
                                            generator)
        return {
            "loss": F.cross_entropy(logits, y, reduction="sum"),
            "accuracy": (logits.argmax(dim=1) == y).sum().to(logits.dtype),
            "elbo": -self._unlabelled(neg_elbo, logits).sum(),
            "count": torch.tensor(float(len(y)), device=x.device),
        }

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, self.classes).to(z.dtype)
        return torch.sigmoid(self.decoder(torch.cat([z, onehot], dim=1))).reshape(len(z), *self.input_shape)

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not is_image(self.input_shape):
            return {}
        device = self.mu.weight.device
        rows = max(1, len(x) // self.classes)
        generator = torch.Generator(device=device).manual_seed(0)
        z = torch.randn((rows, self.latent), generator=generator, device=device)
        # each row one style z, each column one class: the class and the style come apart
        samples = self.decode(z.repeat_interleave(self.classes, dim=0),
                              torch.arange(self.classes, device=device).repeat(rows))
        binary = self.binarize(x)
        h = self.encoder(torch.cat([binary.reshape(len(x), -1),
                                    F.one_hot(self(x).argmax(dim=1), self.classes).to(x.dtype)], dim=1))
        recon = self.decode(self.mu(h), self(x).argmax(dim=1))
        return {"samples": samples, "reconstructions": side_by_side(binary, recon)}


register(ModelSpec("ssvae", SSVAEConfig, SemiSupervisedVAE,
                   "semi-supervised VAE (Kingma et al.'s M2): labelled_fraction of the labels, the class as a latent"))

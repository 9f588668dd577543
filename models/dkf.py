"""Deep Kalman Filter (Krishnan, Shalit & Sontag 2015; the Deep Markov Model of Krishnan et
al., "Structured Inference Networks for Nonlinear State Space Models", 2017).

A state-space model with neural networks in place of the Kalman filter's matrices:

    z_1 ~ N(m_1, diag s_1^2)                                    (learned prior)
    z_t ~ N(mu_T(z_{t-1}), diag sigma_T^2(z_{t-1}))             (gated transition)
    x_t ~ p(x_t | z_t)                                          (Gaussian or Bernoulli emission)

and a structured inference network q(z_t | z_{t-1}, x_{t:T}): a backward GRU over the
observations, combined with the previous latent state (the paper's ST-R; `mf-r` drops the
state, a mean-field q(z_t | x_{t:T})). Training maximises the reparameterised ELBO

    sum_t E_q[log p(x_t | z_t)] - E_q[KL(q(z_t | z_{t-1}, x) || p(z_t | z_{t-1}))]

with each KL term in closed form (both are diagonal Gaussians given z_{t-1}), its weight
annealed from `anneal_start` to 1 over the first `anneal_steps` training steps. Metrics are
per observed step: the ELBO and an importance-sampled negative log-likelihood with
`eval_samples` sequences drawn from q (log-mean-exp of log p(x, z) - log q(z | x)).

A batch is (x, mask): x of shape (N, T, *frame), mask (N, T) with 1 at observed steps. A
masked step adds no likelihood term and the backward GRU carries its state over it; steps
after a sequence's last observed one add no KL term either (a padded tail).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.autoencoder import check_sizes
from models.base import flat_size
from models.registry import ModelSpec, register

INFERENCE = ("st-r", "mf-r")
TRANSITIONS = ("gated", "none")
EMISSIONS = ("auto", "gaussian", "bernoulli")
LOG_2PI = math.log(2 * math.pi)


@dataclass
class DKFConfig:
    latent: int = 4
    """Dimension of the latent state z_t."""
    hidden: int = 64
    """Width of the transition and emission networks."""
    rnn_hidden: int = 64
    """Hidden size of the inference network's backward GRU."""
    transition: str = "gated"
    """gated (the paper's), or none: every z_t drawn from the prior and inferred from x_t
    alone, an independent VAE per step (the baseline a transition must beat)."""
    inference: str = "st-r"
    """st-r: q(z_t | z_{t-1}, x_{t:T}), the backward GRU combined with the previous state;
    mf-r: q(z_t | x_{t:T}), the backward GRU alone."""
    emission: str = "auto"
    """gaussian (a mean network, a learned variance per feature), bernoulli (on frames
    binarised at 0.5, as `vae`), or auto: bernoulli for image frames (T, H, W), gaussian
    for vectors (T, D)."""
    anneal_steps: int = 500
    """Training steps over which the KL weight rises linearly to 1 (0: no annealing)."""
    anneal_start: float = 0.1
    """The KL weight at the first training step."""
    eval_samples: int = 64
    """Sequences drawn from q per example for the importance-sampled test NLL."""


def gaussian_log_density(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (x - mu).pow(2) / logvar.exp()).sum(dim=-1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)), summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp()
                  - 1.0).sum(dim=-1)


class GatedTransition(nn.Module):
    """mu_T(z) = (1 - g) * (W z + b) + g * h(z), a gate g(z) between a linear map (started at
    the identity) and a nonlinear proposal; sigma_T from the proposal (Krishnan et al. 2017)."""

    def __init__(self, latent: int, hidden: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.proposal = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.linear = nn.Linear(latent, latent)
        self.scale = nn.Linear(latent, latent)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(latent))
            self.linear.bias.zero_()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.sigmoid(self.gate(z))
        h = self.proposal(z)
        mu = (1 - g) * self.linear(z) + g * h
        logvar = 2 * torch.log(F.softplus(self.scale(F.relu(h))) + 1e-4)
        return mu, logvar


class Combiner(nn.Module):
    """q(z_t | z_{t-1}, x_{t:T}): 0.5 (tanh(W z_{t-1}) + h_t) for st-r, h_t alone for mf-r."""

    def __init__(self, latent: int, rnn_hidden: int, structured: bool):
        super().__init__()
        self.structured = structured
        self.state = nn.Linear(latent, rnn_hidden) if structured else None
        self.mu = nn.Linear(rnn_hidden, latent)
        self.logvar = nn.Linear(rnn_hidden, latent)

    def forward(self, z_prev: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.structured:
            h = 0.5 * (torch.tanh(self.state(z_prev)) + h)
        return self.mu(h), self.logvar(h)


class DeepKalmanFilter(nn.Module):
    """``forward(x)`` gives the emission means at the posterior means of z (a reconstruction)."""

    task = "generative"

    def __init__(self, cfg: DKFConfig, input_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        if len(input_shape) < 2:
            raise ValueError(f"dkf needs sequences of shape (steps, features...), got examples of shape "
                             f"{tuple(input_shape)}: use a sequence source (data.source lgssm or "
                             f"healing-digits)")
        check_sizes("dkf", "latent, hidden and rnn_hidden", [cfg.latent, cfg.hidden, cfg.rnn_hidden])
        if cfg.inference not in INFERENCE:
            raise ValueError(f"dkf inference must be {' or '.join(INFERENCE)}, got {cfg.inference!r}")
        if cfg.transition not in TRANSITIONS:
            raise ValueError(f"dkf transition must be {' or '.join(TRANSITIONS)}, got {cfg.transition!r}")
        if cfg.emission not in EMISSIONS:
            raise ValueError(f"dkf emission must be {', '.join(EMISSIONS)}, got {cfg.emission!r}")
        if cfg.anneal_steps < 0 or not 0.0 <= cfg.anneal_start <= 1.0:
            raise ValueError(f"dkf needs anneal_steps >= 0 and anneal_start in [0, 1], got "
                             f"{cfg.anneal_steps} and {cfg.anneal_start}")
        if cfg.eval_samples < 1:
            raise ValueError(f"dkf eval_samples must be >= 1, got {cfg.eval_samples}")
        self.input_shape = tuple(input_shape)
        self.frame_shape = self.input_shape[1:]
        self.picture_columns = self.input_shape[0]  # `pictures` draws a sequence's frames in one row
        self.latent, self.eval_samples = cfg.latent, cfg.eval_samples
        self.anneal_steps, self.anneal_start = cfg.anneal_steps, cfg.anneal_start
        self.bernoulli = cfg.emission == "bernoulli" or (cfg.emission == "auto" and len(self.frame_shape) == 2)
        size = flat_size(self.frame_shape)
        self.prior_mu = nn.Parameter(torch.zeros(cfg.latent))
        self.prior_logvar = nn.Parameter(torch.zeros(cfg.latent))
        self.independent = cfg.transition == "none"
        self.transition = None if self.independent else GatedTransition(cfg.latent, cfg.hidden)
        self.emitter = nn.Sequential(nn.Linear(cfg.latent, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, size))
        self.emission_logvar = None if self.bernoulli else nn.Parameter(torch.zeros(size))
        self.rnn = nn.GRU(size, cfg.rnn_hidden, batch_first=True)
        self.combiner = Combiner(cfg.latent, cfg.rnn_hidden, cfg.inference == "st-r" and not self.independent)
        # counted, not passed in: the KL weight follows the model's own training steps, and a
        # resumed run's checkpoint carries the count on
        self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))

    # --- the pieces of the model ------------------------------------------------------------

    def observations(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) flat frames, binarised for a Bernoulli emission."""
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return (flat > 0.5).to(flat.dtype) if self.bernoulli else flat

    def backward_states(self, obs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The backward GRU's state h_t, a summary of x_{t:T} (of x_t alone without a
        transition), for every t: (N, T, H). One fused GRU call where every step is observed
        (`mask` None); step by step where the mask makes it carry its state over unobserved
        steps. No branch on the data's values: `forward` stays exportable (torch.export)."""
        n, steps = obs.shape[:2]
        if self.independent:  # q(z_t | x_t): each frame a sequence of its own
            h = self.rnn(obs.reshape(n * steps, 1, -1))[0].reshape(n, steps, -1)
            return h if mask is None else torch.where(mask[..., None] > 0, h, torch.zeros_like(h))
        if mask is None:
            return self.rnn(obs.flip(1))[0].flip(1)
        observed = mask[..., None] > 0
        h, states = obs.new_zeros(1, n, self.rnn.hidden_size), []
        for t in reversed(range(steps)):
            h = torch.where(observed[None, :, t], self.rnn(obs[:, t:t + 1], h)[1], h)
            states.append(h[0])
        return torch.stack(states[::-1], dim=1)

    def emission_log_prob(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out = self.emitter(z)
        if self.bernoulli:
            return -F.binary_cross_entropy_with_logits(out, obs.expand_as(out), reduction="none").sum(-1)
        return gaussian_log_density(obs.expand_as(out), out, self.emission_logvar.expand_as(out))

    def emission_mean(self, z: torch.Tensor) -> torch.Tensor:
        out = self.emitter(z)
        return torch.sigmoid(out) if self.bernoulli else out

    def prior(self, z_prev: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z_prev is None or self.independent:
            return self.prior_mu.expand_as(like), self.prior_logvar.expand_as(like)
        return self.transition(z_prev)

    # --- the bound and the likelihood -------------------------------------------------------

    def sequence_terms(self, x: torch.Tensor, mask: torch.Tensor, samples: int = 1,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per sequence (shape (samples, N)): `log_px` (observed steps), `kl` (analytic, at the
        sampled z_{t-1}), and `log_ratio` = log p(x, z) - log q(z | x) at the sampled z.
        Only q's draws are sequential (z_t needs z_{t-1}); the transition and the emission
        then run once over all steps."""
        obs, mask = self.observations(x), mask.to(x.dtype)
        alive = mask.flip(1).cummax(dim=1).values.flip(1)  # up to the last observed step
        partial = None if bool((mask > 0).all()) else mask
        hs = self.backward_states(obs, partial).expand(samples, -1, -1, -1)  # (S, N, T, H)
        z = hs.new_zeros(*hs.shape[:2], self.latent)
        draws, mus, logvars = [], [], []
        for t in range(obs.shape[1]):
            mu_q, logvar_q = self.combiner(z, hs[:, :, t])
            eps = torch.randn(mu_q.shape, generator=generator, device=mu_q.device, dtype=mu_q.dtype)
            z = mu_q + torch.exp(0.5 * logvar_q) * eps
            draws.append(z), mus.append(mu_q), logvars.append(logvar_q)
        z, mu_q, logvar_q = (torch.stack(v, dim=2) for v in (draws, mus, logvars))  # (S, N, T, L)
        first = (self.prior_mu.expand_as(z[:, :, :1]), self.prior_logvar.expand_as(z[:, :, :1]))
        if self.independent:
            mu_p, logvar_p = self.prior_mu.expand_as(z), self.prior_logvar.expand_as(z)
        else:
            moved = self.transition(z[:, :, :-1])
            mu_p, logvar_p = (torch.cat([a, b], dim=2) for a, b in zip(first, moved))
        px = self.emission_log_prob(obs, z)  # (S, N, T)
        prior_ratio = gaussian_log_density(z, mu_p, logvar_p) - gaussian_log_density(z, mu_q, logvar_q)
        return {"log_px": (mask * px).sum(-1),
                "kl": (alive * gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)).sum(-1),
                "log_ratio": (mask * px + alive * prior_ratio).sum(-1)}

    def kl_weight(self) -> float:
        if self.anneal_steps == 0:
            return 1.0
        done = min(int(self.steps_trained), self.anneal_steps) / self.anneal_steps
        return self.anneal_start + (1.0 - self.anneal_start) * done

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The negative (annealed) ELBO per observed step of the batch."""
        x, mask = batch
        terms = self.sequence_terms(x, mask)
        weight = self.kl_weight()
        if self.training and torch.is_grad_enabled():
            self.steps_trained += 1
        return -(terms["log_px"] - weight * terms["kl"]).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, mask = batch
        generator = torch.Generator(device=x.device).manual_seed(0)  # the same estimate every time
        terms = self.sequence_terms(x, mask, self.eval_samples, generator)
        elbo = (terms["log_px"] - terms["kl"]).mean(dim=0)
        log_likelihood = torch.logsumexp(terms["log_ratio"], dim=0) - math.log(self.eval_samples)
        return {
            "loss": -elbo.sum(),
            "elbo_per_step": elbo.sum(),
            "nll_per_step": -log_likelihood.sum(),
            "steps": mask.sum(),
            "count": torch.tensor(float(len(x)), device=x.device),
        }

    # --- what the figures show --------------------------------------------------------------

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """E_q[z_t] along each sequence, following q's means: (N, T, latent)."""
        hs = self.backward_states(self.observations(x), mask)
        z, means = x.new_zeros(x.shape[0], self.latent), []  # not len(x): export keeps the batch free
        for t in range(x.shape[1]):
            z, _ = self.combiner(z, hs[:, t])
            means.append(z)
        return torch.stack(means, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.posterior_means(x)
        return self.emission_mean(z).reshape(x.shape)

    @torch.no_grad()
    def continue_sequences(self, x: torch.Tensor, observed: int, steps: int | None = None,
                           seed: int = 0) -> torch.Tensor:
        """The first `observed` steps' posterior means, then the transition sampled for
        `steps` more (default: to the sequences' length): emission means of shape
        (N, observed + steps, *frame)."""
        steps = x.shape[1] - observed if steps is None else steps
        generator = torch.Generator(device=x.device).manual_seed(seed)
        z_all = self.posterior_means(x[:, :observed])
        frames, z = [self.emission_mean(z_all[:, t]) for t in range(observed)], z_all[:, -1]
        for _ in range(steps):
            mu, logvar = self.prior(z, z)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, device=mu.device)
            frames.append(self.emission_mean(z))
        return torch.stack(frames, dim=1).reshape(len(x), observed + steps, *self.frame_shape)

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """For image frames, four rows per sequence: the input (blanked squares and all), its
        reconstruction, its first half observed with the rest sampled from the transition
        (beside the input it should match), and T steps sampled beyond its last."""
        if len(self.frame_shape) != 2:
            return {}
        x = x[:6]
        steps, half = x.shape[1], max(1, x.shape[1] // 2)
        beyond = self.continue_sequences(x, steps, steps)[:, steps:]
        rows = [self.observations(x).reshape(x.shape), self(x), self.continue_sequences(x, half), beyond]
        strip = torch.stack(rows, dim=1).reshape(-1, *self.frame_shape)  # sequence-major rows
        return {"sequences_input_reconstruction_continuation": strip}


register(ModelSpec("dkf", DKFConfig, DeepKalmanFilter,
                   "deep Kalman filter on sequences (gated transition, structured inference, ELBO and "
                   "importance-sampled NLL per step)", sequences=True))

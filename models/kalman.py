"""Linear-Gaussian state-space models (LGSSM) and their exact Kalman filter.

The exact-math foundation of the Deep Kalman Filter family (Krishnan, Shalit & Sontag,
"Deep Kalman Filters", 2015). A DKF replaces the linear maps below by networks and the exact
posterior by an inference network, so on data drawn from an LGSSM its evidence lower bound
can be checked against the true log-likelihood computed here:

    z_1 ~ N(mu0, P0),    z_t = A z_{t-1} + w_t,   w_t ~ N(0, Q),
                         x_t = C z_t + v_t,       v_t ~ N(0, R).

`log_likelihood` is the filter's prediction-error decomposition

    log p(x_1..T) = sum_t log N(x_t; C m_t|t-1, C P_t|t-1 C^T + R),

exact up to rounding. A mask marks the observed steps: a masked-out step is only predicted,
so it adds no term and no measurement update, and a sequence masked after its length gets
the likelihood of its observed prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class LGSSM:
    A: Tensor
    """(S, S) state transition."""
    Q: Tensor
    """(S, S) process noise covariance."""
    C: Tensor
    """(D, S) emission."""
    R: Tensor
    """(D, D) observation noise covariance."""
    mu0: Tensor
    """(S,) mean of the first state."""
    P0: Tensor
    """(S, S) covariance of the first state."""

    def __post_init__(self) -> None:
        S, D = self.A.shape[0], self.C.shape[0]
        expected = {"A": (S, S), "Q": (S, S), "C": (D, S), "R": (D, D), "mu0": (S,), "P0": (S, S)}
        wrong = {name: tuple(getattr(self, name).shape) for name, shape in expected.items()
                 if tuple(getattr(self, name).shape) != shape}
        if wrong:
            raise ValueError(f"LGSSM with state_dim {S} and obs_dim {D} expects shapes {expected}, "
                             f"got {wrong}")

    @property
    def state_dim(self) -> int:
        return self.A.shape[0]

    @property
    def obs_dim(self) -> int:
        return self.C.shape[0]

    def to(self, dtype: torch.dtype) -> LGSSM:
        return LGSSM(**{f.name: getattr(self, f.name).to(dtype) for f in fields(self)})


def _uniform(low_high: tuple[float, float], size: int, generator: torch.Generator) -> Tensor:
    low, high = low_high
    if not 0 < low <= high:
        raise ValueError(f"a noise variance range must satisfy 0 < low <= high, got {low_high}")
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def random_lgssm(state_dim: int, obs_dim: int, seed: int, *, spectral_radius: float = 0.9,
                 process_noise: tuple[float, float] = (0.05, 0.15),
                 observation_noise: tuple[float, float] = (0.1, 0.3)) -> LGSSM:
    """Seeded random parameters whose sequences neither die out nor blow up.

    A is a Haar-random orthogonal matrix times `spectral_radius`. Every eigenvalue then has
    modulus exactly `spectral_radius` < 1, so the state process is stable, and because A is
    normal ||A^k|| = spectral_radius^k: no transient growth, as a non-normal A of the same
    spectral radius could have. The rotation keeps the latent trajectories oscillating rather
    than decaying straight to 0; with Q ~ 0.1 I the stationary state covariance is about
    0.1 / (1 - 0.81) I ~ 0.5 I. Q and R are diagonal with variances drawn uniformly from the
    (low, high) ranges given; C is Gaussian / sqrt(S), so C z has variance about that of one
    state coordinate; mu0 = 0, P0 = I. Float32 tensors; same seed, same bits.
    """
    if state_dim < 1 or obs_dim < 1:
        raise ValueError(f"state_dim and obs_dim must be >= 1, got {state_dim}, {obs_dim}")
    if not 0 <= spectral_radius < 1:
        raise ValueError(f"spectral_radius must be in [0, 1) for a stable model, got {spectral_radius}")
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(state_dim, state_dim, generator=generator, dtype=torch.float64))
    # Fixing the signs by R's diagonal makes q Haar-distributed and independent of LAPACK's convention.
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    C = torch.randn(obs_dim, state_dim, generator=generator, dtype=torch.float64) / math.sqrt(state_dim)
    Q = torch.diag(_uniform(process_noise, state_dim, generator))
    R = torch.diag(_uniform(observation_noise, obs_dim, generator))
    return LGSSM(A=spectral_radius * q, Q=Q, C=C, R=R, mu0=torch.zeros(state_dim, dtype=torch.float64),
                 P0=torch.eye(state_dim, dtype=torch.float64)).to(torch.float32)


def sample(model: LGSSM, n: int, steps: int, seed: int) -> tuple[Tensor, Tensor]:
    """`n` sequences of `steps` states z (n, steps, S) and observations x (n, steps, D), float32."""
    generator = torch.Generator().manual_seed(seed)
    m = model.to(torch.float64)
    S, D = m.state_dim, m.obs_dim
    state_noise = torch.randn(n, steps, S, generator=generator, dtype=torch.float64)
    obs_noise = torch.randn(n, steps, D, generator=generator, dtype=torch.float64)
    chol_p0, chol_q = torch.linalg.cholesky(m.P0), torch.linalg.cholesky(m.Q)
    z = torch.empty(n, steps, S, dtype=torch.float64)
    for t in range(steps):
        if t == 0:
            z[:, 0] = m.mu0 + state_noise[:, 0] @ chol_p0.T
        else:
            z[:, t] = z[:, t - 1] @ m.A.T + state_noise[:, t] @ chol_q.T
    x = z @ m.C.T + obs_noise @ torch.linalg.cholesky(m.R).T
    return z.to(torch.float32), x.to(torch.float32)


def _observed(mask: Tensor | None, n: int, steps: int) -> Tensor:
    if mask is None:
        return torch.ones(n, steps, dtype=torch.bool)
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != (n, steps):
        raise ValueError(f"mask must have shape (n, T) = {(n, steps)}, got {tuple(mask.shape)}")
    return mask != 0


def _kalman_filter(model: LGSSM, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(log p(x_1..T) of each sequence (n,), filtered means (n, T, S)), both float64.

    Float64 throughout, because of the error bound: the log-likelihood is a sum of T terms,
    each log N(...) of magnitude ~D whose Cholesky-based log-determinant and quadratic form
    carry a relative rounding error of up to about kappa * D * u (u the unit roundoff, kappa
    the condition number of the innovation covariance), so the sum may be off by T kappa D^2 u.
    In float32 (u = 6e-8), T = 1000 steps of D = 64 with kappa ~ 100 allow ~ 25 nats, more than
    the gaps between models one wants to compare; in float64 (u = 1.1e-16), ~ 5e-8 nats. The
    covariance recursion also stays symmetric positive definite far longer in float64.
    """
    m = model.to(torch.float64)
    x = torch.as_tensor(x).to(torch.float64)
    if x.dim() != 3 or x.shape[-1] != m.obs_dim:
        raise ValueError(f"x must have shape (n, T, D) with D = {m.obs_dim}, got {tuple(x.shape)}")
    n, steps, D = x.shape
    observed = _observed(mask, n, steps)
    # Unobserved entries may hold anything (NaN padding included): zeroed, it stays out of the arithmetic.
    x = torch.where(observed[..., None], x, 0.0)
    A, Q, C, R = m.A, m.Q, m.C, m.R
    eye = torch.eye(m.state_dim, dtype=torch.float64)
    mean, cov = m.mu0.expand(n, -1), m.P0.expand(n, -1, -1)
    log_likelihood = torch.zeros(n, dtype=torch.float64)
    means = torch.empty(n, steps, m.state_dim, dtype=torch.float64)
    for t in range(steps):
        if t > 0:  # predict
            mean, cov = mean @ A.T, A @ cov @ A.T + Q
        innovation = x[:, t] - mean @ C.T
        innovation_chol = torch.linalg.cholesky(C @ cov @ C.T + R)
        white = torch.linalg.solve_triangular(innovation_chol, innovation[..., None], upper=False)[..., 0]
        term = (-0.5 * (white.square().sum(-1) + D * math.log(2 * math.pi))
                - torch.log(torch.diagonal(innovation_chol, dim1=-2, dim2=-1)).sum(-1))
        # gain K = P C^T S^-1, solved from S K^T = C P rather than inverting S.
        gain = torch.cholesky_solve(C @ cov, innovation_chol).mT
        updated_mean = mean + (gain @ innovation[..., None])[..., 0]
        # Joseph form: a sum of two positive semi-definite terms, so rounding cannot make P indefinite
        # as the textbook (I - K C) P can; symmetrising removes the asymmetric part of the rounding.
        keep = eye - gain @ C
        updated_cov = keep @ cov @ keep.mT + gain @ R @ gain.mT
        updated_cov = 0.5 * (updated_cov + updated_cov.mT)
        now = observed[:, t]
        log_likelihood = log_likelihood + torch.where(now, term, 0.0)
        mean = torch.where(now[:, None], updated_mean, mean)
        cov = torch.where(now[:, None, None], updated_cov, cov)
        means[:, t] = mean
    return log_likelihood, means


def log_likelihood(model: LGSSM, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Exact log p(x_1..T) of each of the n sequences x (n, T, D): float64, shape (n,).

    `mask` (n, T), 0/1 or bool, marks the observed steps; the others add no term.
    """
    return _kalman_filter(model, x, mask)[0]


def filtered_means(model: LGSSM, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """E[z_t | observed x_1..t] (n, T, S), float64; at a masked-out step, the prediction."""
    return _kalman_filter(model, x, mask)[1]

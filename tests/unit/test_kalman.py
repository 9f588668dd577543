"""The Kalman filter against the joint Gaussian of the stacked observations, built directly.

An LGSSM's observations x_1..T are jointly Gaussian, so log p(x_1..T) can be computed without
any filter: one (T*D)-dimensional normal density. The filter's prediction-error decomposition
must agree with it to rounding, masked steps being marginalised out (rows and columns dropped).
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.distributions import MultivariateNormal

from models.kalman import LGSSM, filtered_means, log_likelihood, random_lgssm, sample

# Both sides are float64 from the same float32 parameters and data (cast exactly). Each is a
# backward-stable computation over N = T*D <= 12 dimensions: a Cholesky factorisation and triangular
# solves have relative backward error ~ N u (u = 1.1e-16), which moves a log density of magnitude
# ~N by at most ~ kappa * N^2 * u, kappa the joint covariance's condition number (<= 40 measured
# here; allow 1e3): 1.6e-11 nats. The filter's T steps add the same order again. 1e-9 nats absolute
# plus 1e-10 relative leaves a factor ~30 of margin (the differences measured are ~5e-15) and still
# catches any modelling error (those are >= 1e-3 nats).
TOLERANCE = {"atol": 1e-9, "rtol": 1e-10}


def joint_gaussian(model: LGSSM, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (T*D,) and covariance (T*D, T*D) of the stacked observations, in float64."""
    m = model.to(torch.float64)
    state_means, state_covs = [m.mu0], [m.P0]
    for _ in range(1, steps):
        state_means.append(m.A @ state_means[-1])
        state_covs.append(m.A @ state_covs[-1] @ m.A.T + m.Q)
    D = m.obs_dim
    cov = torch.empty(steps * D, steps * D, dtype=torch.float64)
    for t in range(steps):
        for s in range(t + 1):
            # Cov(z_t, z_s) = A^(t-s) Var(z_s) for t >= s.
            block = m.C @ torch.linalg.matrix_power(m.A, t - s) @ state_covs[s] @ m.C.T
            if s == t:
                block = block + m.R
            cov[t * D:(t + 1) * D, s * D:(s + 1) * D] = block
            cov[s * D:(s + 1) * D, t * D:(t + 1) * D] = block.T
    mean = torch.cat([m.C @ state_mean for state_mean in state_means])
    return mean, cov


def joint_log_density(model: LGSSM, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """log density of each sequence of x (n, T, D) under the joint Gaussian, marginalised onto the
    steps where `keep` (T,) is True."""
    n, steps, D = x.shape
    mean, cov = joint_gaussian(model, steps)
    flat = x.to(torch.float64).reshape(n, steps * D)
    if keep is not None:
        rows = keep.repeat_interleave(D)
        mean, cov, flat = mean[rows], cov[rows][:, rows], flat[:, rows]
    return MultivariateNormal(mean, covariance_matrix=cov).log_prob(flat)


@pytest.mark.parametrize("state_dim, obs_dim, steps", [(2, 3, 4), (1, 1, 4), (1, 1, 1), (3, 2, 5)])
def test_log_likelihood_equals_the_joint_gaussian_density(state_dim, obs_dim, steps):
    model = random_lgssm(state_dim, obs_dim, seed=3)
    _, x = sample(model, 5, steps, seed=4)
    got = log_likelihood(model, x)
    assert got.dtype == torch.float64 and got.shape == (5,)
    torch.testing.assert_close(got, joint_log_density(model, x), **TOLERANCE)


def test_log_likelihood_holds_for_a_non_zero_initial_mean_and_correlated_noise():
    """random_lgssm's mu0 = 0 and diagonal Q, R would hide a transposed or dropped term."""
    g = torch.Generator().manual_seed(0)

    def covariance(k: int, scale: float) -> torch.Tensor:
        factor = torch.randn(k, k, generator=g) / k + torch.eye(k)
        return scale * (factor @ factor.T)

    model = LGSSM(A=torch.tensor([[0.6, 0.3], [-0.2, 0.7]]), Q=covariance(2, 0.2),
                  C=torch.randn(3, 2, generator=g), R=covariance(3, 0.3), mu0=torch.tensor([1.0, -2.0]),
                  P0=covariance(2, 1.0))
    _, x = sample(model, 4, 4, seed=1)
    torch.testing.assert_close(log_likelihood(model, x), joint_log_density(model, x), **TOLERANCE)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_masking_the_last_steps_gives_the_likelihood_of_the_prefix(k):
    model = random_lgssm(2, 3, seed=5)
    _, x = sample(model, 6, 6, seed=6)
    mask = torch.ones(6, 6)
    mask[:, 6 - k:] = 0
    x_padded = x.clone()
    x_padded[:, 6 - k:] = float("nan")  # what lies beyond a sequence's length must not matter
    torch.testing.assert_close(log_likelihood(model, x_padded, mask), log_likelihood(model, x[:, :6 - k]),
                               **TOLERANCE)


def test_variable_lengths_in_one_batch():
    model = random_lgssm(2, 3, seed=7)
    _, x = sample(model, 3, 5, seed=8)
    lengths = torch.tensor([5, 2, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]  # bools work as well as 0/1 floats
    got = log_likelihood(model, x, mask)
    want = torch.stack([log_likelihood(model, x[i:i + 1, :length])[0] for i, length in enumerate(lengths)])
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_a_masked_middle_step_is_marginalised_out():
    model = random_lgssm(2, 3, seed=9)
    _, x = sample(model, 5, 4, seed=10)
    keep = torch.tensor([True, False, True, True])
    mask = keep.to(torch.float32).expand(5, 4)
    torch.testing.assert_close(log_likelihood(model, x, mask), joint_log_density(model, x, keep), **TOLERANCE)


def test_a_fully_masked_sequence_has_log_likelihood_zero_and_predicted_means():
    model = random_lgssm(2, 2, seed=11)
    _, x = sample(model, 2, 3, seed=12)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert log_likelihood(model, x, mask)[1] == 0
    # With nothing observed the filtered mean is the prior mean, A^t mu0 = 0 here.
    assert torch.equal(filtered_means(model, x, mask)[1], torch.zeros(3, 2, dtype=torch.float64))


def test_same_seed_same_bits_other_seed_other_values():
    a, b, other = random_lgssm(3, 4, seed=1), random_lgssm(3, 4, seed=1), random_lgssm(3, 4, seed=2)
    for name in ("A", "Q", "C", "R", "mu0", "P0"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("A", "Q", "C", "R"):
        assert not torch.equal(getattr(a, name), getattr(other, name)), name
    z1, x1 = sample(a, 4, 6, seed=1)
    z2, x2 = sample(a, 4, 6, seed=1)
    z3, x3 = sample(a, 4, 6, seed=2)
    assert torch.equal(z1, z2) and torch.equal(x1, x2)
    assert not torch.equal(z1, z3) and not torch.equal(x1, x3)
    assert z1.dtype == x1.dtype == torch.float32 and z1.shape == (4, 6, 3) and x1.shape == (4, 6, 4)


def test_random_lgssm_is_stable_with_positive_noise():
    model = random_lgssm(4, 3, seed=0, spectral_radius=0.9)
    radius = torch.linalg.eigvals(model.A.to(torch.float64)).abs()
    torch.testing.assert_close(radius, torch.full((4,), 0.9, dtype=torch.float64), atol=1e-6, rtol=0)
    for noise in (model.Q, model.R):
        assert torch.equal(noise, torch.diag(torch.diagonal(noise))) and (torch.diagonal(noise) > 0).all()
    assert torch.equal(model.mu0, torch.zeros(4)) and torch.equal(model.P0, torch.eye(4))


def test_filtered_mean_at_one_step_is_the_closed_form_posterior_mean():
    model = random_lgssm(3, 2, seed=13).to(torch.float64)
    model = replace(model, mu0=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    _, x = sample(model, 4, 1, seed=14)
    C, P0, mu0 = model.C, model.P0, model.mu0
    gain = P0 @ C.T @ torch.linalg.inv(C @ P0 @ C.T + model.R)
    want = mu0 + (x[:, 0].to(torch.float64) - mu0 @ C.T) @ gain.T
    torch.testing.assert_close(filtered_means(model, x)[:, 0], want, **TOLERANCE)


def test_filtered_means_track_the_latents():
    """Loose: the filter's means are nearer the true states than the prior mean 0 is."""
    model = random_lgssm(2, 4, seed=15)
    z, x = sample(model, 50, 20, seed=16)
    error = (filtered_means(model, x) - z).square().mean()
    assert error < 0.5 * z.to(torch.float64).square().mean()


def test_the_true_model_explains_its_data_better_than_one_without_dynamics():
    """With A = 0 the states are independent N(0, Q) draws: the data's temporal structure and
    its stationary variance ~ Q / (1 - 0.81) are lost, costing far more than the margin below
    (measured: -3.2 against -6.1 nats per step; the sampling noise of a mean is ~ 0.02)."""
    model = random_lgssm(3, 4, seed=17)
    _, x = sample(model, 200, 20, seed=18)
    true = log_likelihood(model, x).mean() / 20
    static = log_likelihood(replace(model, A=torch.zeros_like(model.A)), x).mean() / 20
    assert math.isfinite(true) and true > static + 1.0

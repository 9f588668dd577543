"""The sequence generators: shapes, dtypes, seeds, and what each promises of its data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models.kalman import log_likelihood
from pipelines.sequences import healing_digits, lgssm_sequences, rotate

DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return healing_digits(steps=4, seed=0)


def test_lgssm_sequences_shapes_dtypes_and_likelihood():
    data = lgssm_sequences(samples=6, steps=5, state_dim=2, obs_dim=3, seed=0)
    assert data.x.shape == (6, 5, 3) and data.x.dtype == np.float32
    assert data.mask.shape == (6, 5) and data.mask.dtype == np.float32 and (data.mask == 1).all()
    assert data.latents.shape == (6, 5, 2) and data.latents.dtype == np.float32
    assert data.log_likelihood.shape == (6,) and data.log_likelihood.dtype == np.float64
    assert data.blanked is None and data.labels is None and data.clean is None
    exact = log_likelihood(data.model, torch.from_numpy(data.x)).numpy()
    np.testing.assert_array_equal(data.log_likelihood, exact)


def test_lgssm_sequences_are_deterministic_in_the_seed():
    a, b, other = (lgssm_sequences(4, 3, 2, 2, seed=s) for s in (1, 1, 2))
    for name in ("x", "latents", "log_likelihood"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(other, name))
    assert torch.equal(a.model.A, b.model.A) and not torch.equal(a.model.A, other.model.A)


def test_healing_digits_shapes_and_dtypes(digits):
    assert digits.x.shape == digits.clean.shape == digits.blanked.shape == (DIGITS, 4, 64)
    assert digits.x.dtype == digits.clean.dtype == np.float32 and digits.blanked.dtype == np.bool_
    assert digits.mask.shape == (DIGITS, 4) and digits.mask.dtype == np.float32 and (digits.mask == 1).all()
    assert digits.labels.shape == (DIGITS,) and digits.labels.dtype == np.int64
    np.testing.assert_array_equal(digits.labels, load_digits().target)
    assert digits.latents is None and digits.log_likelihood is None and digits.model is None


def test_healing_digits_are_binary_and_blanked_pixels_are_zero(digits):
    assert set(np.unique(digits.x)) <= {0.0, 1.0} and set(np.unique(digits.clean)) <= {0.0, 1.0}
    assert (digits.x[digits.blanked] == 0).all()
    np.testing.assert_array_equal(digits.x[~digits.blanked], digits.clean[~digits.blanked])


@pytest.mark.parametrize("square", [1, 3])
def test_blanked_steps_are_one_square_at_about_the_blank_probability(square):
    data = healing_digits(steps=4, seed=1, square=square, blank_probability=0.3)
    per_step = data.blanked.sum(-1)
    assert set(np.unique(per_step)) == {0, square * square}
    # A step is blanked independently with probability p: over n steps the fraction's standard
    # deviation is sqrt(p (1 - p) / n), 0.0054 here; 4 of them fail once in ~16000 seeds.
    n, p = per_step.size, 0.3
    assert abs((per_step > 0).mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    # The square sits anywhere, so every pixel is blanked somewhere.
    assert data.blanked.any(axis=(0, 1)).all()


def test_healing_digits_are_deterministic_in_the_seed(digits):
    again, other = healing_digits(steps=4, seed=0), healing_digits(steps=4, seed=1)
    for name in ("x", "clean", "blanked"):
        np.testing.assert_array_equal(getattr(digits, name), getattr(again, name))
        assert not np.array_equal(getattr(digits, name), getattr(other, name))


def test_step_zero_at_angle_zero_is_the_binarised_digit_and_the_digit_turns():
    data = healing_digits(steps=3, seed=2, blank_probability=0.0, start_angle=0.0, angle_step=90.0)
    binarised = (load_digits().images / 16 > 0.5).reshape(DIGITS, 64).astype(np.float32)
    assert not data.blanked.any()
    np.testing.assert_array_equal(data.x[:, 0], binarised)
    # A quarter turn maps pixels onto pixels exactly, so step 1 is the digit turned by np.rot90.
    turned = np.rot90(binarised.reshape(DIGITS, 8, 8), k=1, axes=(1, 2)).reshape(DIGITS, 64)
    np.testing.assert_array_equal(data.x[:, 1], turned)


def test_rotate_is_bilinear_and_zero_outside():
    image = np.arange(16.0).reshape(4, 4)
    np.testing.assert_allclose(rotate(image[None], np.array([360.0]))[0], image, atol=1e-12)
    np.testing.assert_allclose(rotate(image[None], np.array([180.0]))[0], image[::-1, ::-1], atol=1e-12)
    # At 45 degrees a corner pixel of an 8x8 image samples a point over a pixel outside it: 0.
    assert rotate(np.ones((1, 8, 8)), np.array([45.0]))[0, 0, 0] == 0
    # A turn keeps a constant image constant wherever it samples only the inside.
    assert rotate(np.ones((1, 4, 4)), np.array([30.0]))[0, 1:3, 1:3] == pytest.approx(1.0)

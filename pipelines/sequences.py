"""Seeded sequence data for Deep Kalman Filters (Krishnan, Shalit & Sontag, 2015).

Two generators, both deterministic in their seed and returning numpy arrays:

- `lgssm_sequences`: observations of a random linear-Gaussian state-space model, with the true
  latent states and the exact Kalman log-likelihood of every sequence, so that a model's bound
  on log p(x) can be compared with the truth.
- `healing_digits`: the paper's "Healing MNIST" on scikit-learn's bundled 8x8 digits (no
  download): each digit rotates by a fixed angle per step, binarised, and at random steps a
  square of pixels is blanked out; the clean frames are kept, so a model's reconstruction of
  the blanked pixels ("healing") can be scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.kalman import LGSSM, log_likelihood, random_lgssm, sample

DIGIT_SIDE = 8
"""Side of scikit-learn's digit images, in pixels."""
DIGIT_MAX = 16.0
"""Largest pixel value of scikit-learn's digit images."""


@dataclass
class SequenceData:
    x: np.ndarray
    """(samples, steps, features) float32 observations."""
    mask: np.ndarray
    """(samples, steps) float32, 1 where a step is observed."""
    latents: np.ndarray | None = None
    """(samples, steps, state_dim) float32 true latent states, where known."""
    log_likelihood: np.ndarray | None = None
    """(samples,) float64 exact log p(x) of each sequence, where known."""
    model: LGSSM | None = None
    """The model that generated the data, where it is one."""
    blanked: np.ndarray | None = None
    """(samples, steps, features) bool, True for pixels set to 0 by blanking."""
    labels: np.ndarray | None = None
    """(samples,) int64 class of each sequence."""
    clean: np.ndarray | None = None
    """(samples, steps, features) float32 frames before blanking."""


def _sample_seed(seed: int) -> int:
    # Drawn from the seed rather than seed + 1, which would be the parameter seed of seed + 1.
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def lgssm_sequences(samples: int, steps: int, state_dim: int, obs_dim: int, seed: int) -> SequenceData:
    """`samples` sequences from `random_lgssm(state_dim, obs_dim, seed)`, with their latents and
    exact log-likelihoods."""
    model = random_lgssm(state_dim, obs_dim, seed)
    z, x = sample(model, samples, steps, _sample_seed(seed))
    return SequenceData(x=x.numpy(), mask=np.ones((samples, steps), dtype=np.float32), latents=z.numpy(),
                        log_likelihood=log_likelihood(model, x).numpy(), model=model)


def rotate(images: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Each square image of `images` (..., side, side) rotated about its centre by its angle
    `degrees` (...,), counter-clockwise as displayed, by bilinear interpolation; what comes from
    outside the image is 0.

    Each output pixel takes the value at the point that the inverse rotation maps it to, so
    every output pixel gets a value and none is written twice.
    """
    side = images.shape[-1]
    centre = (side - 1) / 2
    theta = np.deg2rad(np.asarray(degrees, dtype=np.float64))[..., None, None]
    rows, cols = np.meshgrid(np.arange(side) - centre, np.arange(side) - centre, indexing="ij")
    # Rows grow downwards, so a counter-clockwise turn on screen is clockwise in (row, col).
    cos, sin = np.cos(theta), np.sin(theta)
    src_rows = cos * rows + sin * cols + centre
    src_cols = cos * cols - sin * rows + centre
    # cos 90 degrees is 6e-17, not 0: snapping such near-integers keeps quarter turns exact, and a
    # pixel at the binarisation threshold from flipping on a rounding error.
    src_rows, src_cols = np.round(src_rows, 9), np.round(src_cols, 9)
    top, left = np.floor(src_rows), np.floor(src_cols)
    down, right = src_rows - top, src_cols - left
    flat = images.reshape(-1, side * side)
    batch = np.arange(flat.shape[0]).reshape(images.shape[:-2] + (1, 1))
    out = np.zeros(np.broadcast_shapes(images.shape, src_rows.shape))
    for dr, dc, weight in ((0, 0, (1 - down) * (1 - right)), (0, 1, (1 - down) * right),
                           (1, 0, down * (1 - right)), (1, 1, down * right)):
        r, c = (top + dr).astype(np.int64), (left + dc).astype(np.int64)
        inside = (r >= 0) & (r < side) & (c >= 0) & (c < side)
        index = np.clip(r, 0, side - 1) * side + np.clip(c, 0, side - 1)
        out += np.where(inside, weight * flat[batch, index], 0.0)
    return out


def healing_digits(steps: int, seed: int, square: int = 3, blank_probability: float = 0.3,
                   angle_step: float = 15.0, start_angle: float | None = None) -> SequenceData:
    """For each of scikit-learn's 1797 digits, `steps` frames (64 pixels) of the digit turning
    counter-clockwise `angle_step` degrees per step from `start_angle` (uniform in [0, 360) per
    sequence when None), rotated bilinearly and binarised (pixel / 16 > 0.5), each frame with
    probability `blank_probability` having a `square` x `square` block at a uniform position
    set to 0. `clean` holds the frames before blanking, `blanked` the pixels of the blocks."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 1 <= square <= DIGIT_SIDE:
        raise ValueError(f"square must be between 1 and {DIGIT_SIDE} pixels, got {square}")
    if not 0 <= blank_probability <= 1:
        raise ValueError(f"blank_probability must be in [0, 1], got {blank_probability}")
    # Imported here: scikit-learn's datasets take a second to import, which lgssm_sequences need not pay.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images / DIGIT_MAX, digits.target.astype(np.int64)
    samples = len(images)
    rng = np.random.default_rng(seed)
    starts = rng.uniform(0.0, 360.0, samples) if start_angle is None else np.full(samples, float(start_angle))
    angles = starts[:, None] + angle_step * np.arange(steps)
    clean = rotate(images[:, None], angles) > 0.5

    blank = rng.random((samples, steps)) < blank_probability
    corner = rng.integers(0, DIGIT_SIDE - square + 1, size=(samples, steps, 2))
    rows = np.arange(DIGIT_SIDE)[:, None]
    cols = np.arange(DIGIT_SIDE)[None, :]
    top, left = corner[..., 0, None, None], corner[..., 1, None, None]
    in_square = (rows >= top) & (rows < top + square) & (cols >= left) & (cols < left + square)
    blanked = (in_square & blank[..., None, None]).reshape(samples, steps, DIGIT_SIDE * DIGIT_SIDE)
    clean = clean.reshape(samples, steps, DIGIT_SIDE * DIGIT_SIDE).astype(np.float32)
    return SequenceData(x=np.where(blanked, 0.0, clean).astype(np.float32),
                        mask=np.ones((samples, steps), dtype=np.float32), blanked=blanked,
                        labels=labels, clean=clean)

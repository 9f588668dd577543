"""raydeep's stratified split and digits loader against scikit-learn's, which they replace
on the start-up path: the same split, bit for bit, and the same table."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipelines.split import digits, stratified_split


def test_the_digits_are_scikit_learns():
    x, y = digits()
    bunch = load_digits()
    assert np.array_equal(x, bunch.data) and np.array_equal(y, bunch.target)


@pytest.mark.parametrize("sizes, fraction", [
    ([178, 182, 177, 183, 181, 182, 181, 179, 174, 180], 0.2),  # the digits' classes
    ([178, 182, 177, 183, 181, 182, 181, 179, 174, 180], 0.15),
    ([50, 50, 50], 0.3), ([2, 2, 2, 7], 0.5), ([3, 100], 0.1), ([5, 5, 6], 0.25),
    ([13, 7, 7, 7, 2], 0.33), ([40, 41, 39, 40], 0.125),
])
@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_the_split_is_scikit_learns(sizes, fraction, seed):
    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))
    index = np.arange(len(y))
    expected_train, expected_test = train_test_split(index, test_size=fraction, stratify=y,
                                                     random_state=seed)
    train, test = stratified_split(y, fraction, seed)
    assert np.array_equal(train, expected_train) and np.array_equal(test, expected_test)


@pytest.mark.parametrize("y, fraction, message", [
    ([0, 0, 1], 0.5, "1 of 2 classes have a single example (first: 1)"),
    ([0, 1] * 3, 0.1, "2 classes do not fit in parts of 5 and 1 examples"),
    ([0, 1] * 3, 1.0, "the fraction 1.0 must be in (0, 1)"),
])
def test_what_cannot_be_split_is_said(y, fraction, message):
    with pytest.raises(ValueError) as raised:
        stratified_split(np.array(y), fraction, 0)
    assert message in str(raised.value)


def test_the_digits_runs_train_on_the_split_scikit_learn_made():
    from pipelines.config import DataSection
    from pipelines.data import load

    section = DataSection()
    loaded = load(section, seed=3)
    bunch = load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), bunch.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=section.test_fraction, stratify=y,
                                                      random_state=3)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=section.val_fraction,
                                                      stratify=y_rest, random_state=3)
    for ours, theirs in [(loaded.x_train, x_train), (loaded.y_train, y_train), (loaded.x_val, x_val),
                         (loaded.y_val, y_val), (loaded.x_test, x_test), (loaded.y_test, y_test)]:
        assert np.array_equal(ours.numpy(), theirs)

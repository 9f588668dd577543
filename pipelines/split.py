"""Train/test splits (stratified, or shuffled for regression targets) and the bundled digits, without importing scikit-learn.

Importing scikit-learn costs about 0.9 s of CPU, on the path of every run before Ray is
asked for, for two small things: the digits table it ships and a stratified split. Both are
done here with numpy. The split is scikit-learn's `train_test_split(..., stratify=y,
random_state=seed)` step for step (its `StratifiedShuffleSplit` and `_approximate_mode`,
scikit-learn 1.x), drawing the same numbers from the same `RandomState`, so every run
keeps the split its accuracy bars were set on; `tests/unit/test_split.py` holds the two
to each other on many sizes and seeds.
"""
from __future__ import annotations

import importlib.util
from math import ceil
from pathlib import Path

import numpy as np


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): `test_fraction` of the examples (rounded up) for the test part,
    each class in proportion, shuffled by `seed`. A `ValueError` says why it cannot be done."""
    n = len(y)
    if not 0 < test_fraction < 1:
        raise ValueError(f"the fraction {test_fraction} must be in (0, 1)")
    n_test = ceil(test_fraction * n)
    n_train = n - n_test
    if n_train == 0:
        raise ValueError(f"{n} examples leave none for training with a fraction of {test_fraction} held out")
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:  # the first only: a table may have thousands of such classes
        single = classes[class_counts < 2]
        raise ValueError(f"{len(single)} of {len(classes)} classes have a single example (first: "
                         f"{single[0].item()!r}); a stratified split needs at least 2 of each")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"{len(classes)} classes do not fit in parts of {n_train} and {n_test} examples")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i, count in enumerate(class_counts):
        members = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(members[:n_i[i]])
        test.extend(members[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def shuffle_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of a split that ignores the labels (a regression target has no
    classes to keep in proportion): scikit-learn's `train_test_split(..., random_state=seed)`
    without `stratify`, its `ShuffleSplit` step for step."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"the fraction {test_fraction} must be in (0, 1)")
    n_test = ceil(test_fraction * n)
    if n - n_test <= 0:
        raise ValueError(f"{n} examples leave none for training with a fraction of {test_fraction} held out")
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[n_test:], permutation[:n_test]


def _approximate_mode(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Examples per class in a draw of `draws`: the proportional share, rounded down, plus
    one for the largest remainders (ties broken by `rng`) until the total is `draws`."""
    continuous = class_counts / class_counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            now = min(len(tied), need)
            floored[rng.choice(tied, size=now, replace=False)] += 1
            need -= now
            if need == 0:
                break
    return floored.astype(int)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, pixel values 0-16, labels 0-9), read
    from the file the package ships, found without importing the package."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data set ships with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)

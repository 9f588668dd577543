"""Which split (train, validation, test) and which worker's part each row of a streamed
table falls in: a 64-bit hash of the row's feature bits and label, integer arithmetic that
every machine and every reader computes alike, so that the driver's scan and each worker's
reads agree on every row without exchanging anything."""
from __future__ import annotations

import numpy as np

_PRIME = np.uint64(0x100000001B3)


def row_hash(x: np.ndarray, labels) -> np.ndarray:
    """Each row's 64-bit hash of its float32 features' bits and its label (an array as
    arrow's `to_numpy` gives it): integer arithmetic, the same on every machine."""
    import pandas as pd

    # One contiguous row of 32-bit words per feature (a column-major x is one already): the
    # loop below then reads memory in order, 2 ms for 65,536 rows of 64 where a strided walk
    # over a row-major copy widened to 64 bits took 29.
    words = np.ascontiguousarray(x.reshape(len(x), -1).T).view(np.uint32)
    h = np.full(len(x), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in words:  # FNV-1a over 32-bit words, then SplitMix64's finaliser
            h ^= column
            h *= _PRIME
        values = np.asarray(labels)
        h ^= pd.util.hash_array(values.astype(object) if values.dtype.kind in "USO" else values).astype(np.uint64)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def split_of(x: np.ndarray, labels, test_fraction: float, val_fraction: float) -> np.ndarray:
    """Each row's split (0 train, 1 validation, 2 test), from the top 53 bits of its hash."""
    return split_of_hashes(row_hash(x, labels), test_fraction, val_fraction)


def split_of_hashes(h: np.ndarray, test_fraction: float, val_fraction: float) -> np.ndarray:
    u = (h >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return np.where(u < test_fraction, 2, np.where(u < test_fraction + (1 - test_fraction) * val_fraction, 1, 0))


def part_of(x: np.ndarray, labels, parts: int) -> np.ndarray:
    """Each row's part of `parts` (a `ps` worker's own rows), from the 11 low bits of its
    hash, which the split does not use: every part holds the same share of each split."""
    return part_of_hashes(row_hash(x, labels), parts)


def part_of_hashes(h: np.ndarray, parts: int) -> np.ndarray:
    return ((h & np.uint64(0x7FF)) % np.uint64(parts)).astype(np.int64)

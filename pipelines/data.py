"""Data sets: the bundled digits, Parquet/CSV tables read with pyarrow (`pipelines.tables`:
a file, a directory or glob of files, on this machine or an object store), synthetic blobs.

Everything is loaded on the driver into tensors and split once (stratified by class, or
shuffled for a regression target (`pipelines.labels`), by seed; a table's validation and
test splits may be tables of their own, `data.val_source`/`test_source`);
strategies then hand each worker a disjoint shard of every global batch (`pipelines.training.loop`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipelines import labels, rows, sequence_data, split, streaming
from pipelines.config import GENERATED_SOURCES, SEQUENCE_SOURCES, DataSection
from pipelines.dataset import Dataset
from pipelines.errors import DataError
from pipelines.memory import gib, machine_memory


def load(section: DataSection, seed: int = 0, dataset=None) -> Dataset:
    """Load, shape and split the data the section names: a table's validation and test
    splits come from `data.val_source`/`data.test_source` where given, from the training
    table (stratified, by seed) where not."""
    if section.stream or dataset is not None:  # a user's ray.data.Dataset always streams
        data = streaming.load(section, seed, dataset)
        _check_batch(section, data)
        return data
    if section.source in SEQUENCE_SOURCES or section.sequences.column:
        data = sequence_data.load(section, seed)
        _check_batch(section, data)
        return data
    held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    task, columns = "classification", None
    if section.source == "digits":
        x, y, names = _digits()
    elif section.source == "synthetic":
        check_synthetic_size(section)
        x, y, names = synthetic(section.synthetic_samples, section.synthetic_shape,
                                section.synthetic_classes, seed)
    else:
        train = rows.read_labelled(section.source, section.label)
        task = labels.task_of(train.label_type, section.task, section.source, section.label)
        columns = train.columns
        if task == "regression":
            classes, names = None, []
            y = labels.targets(train.labels, section.source, section.label)
            labels.check_spread(y, section.source, section.label)
        else:
            classes = labels.classes(train.labels, section.source, section.label)
            y, names = labels.encode(train.labels, classes), [str(c) for c in classes]
        x = train.x
        for which in ("val", "test"):
            source = getattr(section, f"{which}_source")
            if source:
                held[which] = rows.read_held_out(source, f"data.{which}_source", section, train, classes)
    if section.input_shape:
        x = rows.reshape(x, section.input_shape, section.source)
        held = {k: (rows.reshape(hx, section.input_shape, section.source), hy) for k, (hx, hy) in held.items()}
    data = _split(section.source, x, y, names, section.test_fraction, section.val_fraction, seed, held,
                  stratify=task == "classification")
    data.columns = columns
    if task == "regression":
        data.task = task
        data.target_mean, data.target_std = labels.scale(data.y_train.numpy())
    is_table = section.source not in GENERATED_SOURCES
    if is_table if section.standardize is None else section.standardize:
        standardize(data)
    _check_batch(section, data)
    return data


def _check_batch(section: DataSection, data: Dataset) -> None:
    if data.train_rows < section.batch_size:
        raise DataError(
            f"data.batch_size ({section.batch_size}) exceeds the training split "
            f"({data.train_rows} examples of {section.source})"
        )


def standardize(data: Dataset) -> None:
    """Scale every feature to the training split's zero mean and unit variance (a constant
    feature is only centred), in place; validation and test use the training statistics.
    Without it, columns of very different scales leave SGD at a fraction of a linear
    model's accuracy (0.64 against 0.98 on a public table, issue 17)."""
    x = data.x_train.double()  # float64 sums: a column of 1e6-sized values keeps its digits
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    mean, std = mean.float(), std.float()
    for name in ("x_train", "x_val", "x_test"):
        setattr(data, name, ((getattr(data, name) - mean) / std).contiguous())
    data.feature_mean, data.feature_std = mean, std


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    pixels, labels = split.digits()
    x = (pixels / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, labels.astype(np.int64), [str(c) for c in range(10)]


def synthetic(samples: int, shape: list[int], classes: int, seed: int):
    """Gaussian blobs around one random prototype per class: learnable, any size and shape."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, size=(classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=samples).astype(np.int64)
    noise = rng.normal(0.0, 0.35, size=(samples, *shape)).astype(np.float32)
    return prototypes[y] + noise, y, [str(c) for c in range(classes)]


BYTES_PER_VALUE = 24
"""Peak bytes per synthetic feature value while drawn and split: numpy draws the noise in
float64 (8), then float32 copies for the noise, the blobs and the split parts (4 each)."""


def check_synthetic_size(section: DataSection) -> None:
    """Refuse synthetic data this machine cannot hold, in one line: numpy would raise a
    MemoryError (or 'array is too big') halfway through drawing it."""
    shape = list(section.synthetic_shape)
    samples, classes = section.synthetic_samples, section.synthetic_classes
    values = (samples + classes) * math.prod(shape)  # Python ints: a huge shape cannot wrap to 0
    need, memory = values * BYTES_PER_VALUE, machine_memory()
    if need > memory:
        raise DataError(
            f"synthetic data of {samples:,} examples and {classes:,} class prototypes of shape {shape} "
            f"is {values:,} values, about {gib(need)} GiB while drawn, and this machine has "
            f"{gib(memory)} GiB: ask for fewer data.synthetic_samples or classes, or a smaller shape")


def _split(name, x, y, names, test_fraction, val_fraction, seed, held=None, stratify=True) -> Dataset:
    """Train, validation and test splits: each of `held` ("val", "test": features and
    labels) as given, the others drawn from `x`, `y` (stratified unless `stratify` is
    False, fixed by `seed`)."""
    held = held or {}
    drawn = "test" not in held or ("val" not in held and val_fraction > 0)  # a split is made
    draw = split.stratified_split if stratify else (lambda labels, f, s: split.shuffle_split(len(labels), f, s))
    present, counts = np.unique(y, return_counts=True) if stratify else (np.array([]), np.array([]))
    single = [names[c] for c in present[counts < 2]]
    if single and drawn:  # said here: the split's own message lists every such class
        more = "; draw more data.synthetic_samples or fewer data.synthetic_classes" if name == "synthetic" else ""
        raise DataError(f"cannot split {name} into train/val/test: {len(single)} of its {len(present)} "
                        f"classes have a single example (first: {single[0]!r}); a stratified split "
                        f"needs at least 2 of each{more}")
    try:
        if "test" in held:
            x_rest, y_rest, (x_test, y_test) = x, y, held["test"]
        else:
            rest, test = draw(y, test_fraction, seed)
            x_rest, x_test, y_rest, y_test = x[rest], x[test], y[rest], y[test]
        if "val" in held:
            x_train, y_train, (x_val, y_val) = x_rest, y_rest, held["val"]
        elif val_fraction > 0:
            train, val = draw(y_rest, val_fraction, seed)
            x_train, x_val, y_train, y_val = x_rest[train], x_rest[val], y_rest[train], y_rest[val]
        else:
            x_train, y_train, x_val, y_val = x_rest, y_rest, x_rest[:0], y_rest[:0]
    except ValueError as e:
        raise DataError(f"cannot split {name} into train/val/test: {e}") from None
    t = torch.from_numpy
    return Dataset(name, t(np.ascontiguousarray(x_train)), t(y_train), t(np.ascontiguousarray(x_val)),
                   t(y_val), t(np.ascontiguousarray(x_test)), t(y_test), names)

"""Data sets: the bundled digits, Parquet/CSV tables read with pyarrow (`pipelines.tables`:
a file, a directory or glob of files, on this machine or an object store), synthetic blobs.

Everything is loaded on the driver into tensors and split once (stratified by class, or
shuffled for a regression target (`pipelines.labels`), by seed; a table's validation and
test splits may be tables of their own, `data.val_source`/`test_source`);
strategies then hand each worker a disjoint shard of every global batch (`pipelines.training.loop`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import labels, split
from pipelines.config import DataSection
from pipelines.errors import DataError


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    feature_mean: torch.Tensor | None = None
    """The training split's per-feature mean and standard deviation the features were
    standardised with (`data.standardize`); None when they are used as they are."""
    feature_std: torch.Tensor | None = None
    task: str = "classification"
    """classification (labels are class indices) or regression (labels are float targets)."""
    target_mean: float = 0.0
    """A regression target's training mean and standard deviation (`models.targets`)."""
    target_std: float = 1.0
    columns: list[tuple[str, str]] | None = None
    """A table's feature columns and their arrow types (`pipelines.serving`: the logged model
    takes a DataFrame of them); None for digits, synthetic data and a list column."""
    stream: object = None
    """`pipelines.streaming.StreamedTable` where the training rows stay on disk
    (`data.stream`; `x_train` is then empty); None where they are in memory."""

    @property
    def train_rows(self) -> int:
        return self.stream.rows if self.stream is not None else len(self.y_train)

    def sample(self, n: int) -> tuple:
        """A few examples of the data: validation rows, else test, else training rows."""
        for x, y in ((self.x_val, self.y_val), (self.x_test, self.y_test), (self.x_train, self.y_train)):
            if len(y):
                return x[:n], y[:n]
        return self.x_train[:n], self.y_train[:n]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """The model's outputs per example: one per class, or the one regressed value."""
        return 1 if self.task == "regression" else self.num_classes


def load(section: DataSection, seed: int = 0) -> Dataset:
    """Load, shape and split the data the section names: a table's validation and test
    splits come from `data.val_source`/`data.test_source` where given, from the training
    table (stratified, by seed) where not."""
    if section.stream:
        from pipelines import streaming

        data = streaming.load(section, seed)
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
        train = _read_labelled(section.source, section.label)
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
                held[which] = _read_held_out(source, f"data.{which}_source", section, train, classes)
    if section.input_shape:
        x = _reshape(x, section.input_shape, section.source)
        held = {k: (_reshape(hx, section.input_shape, section.source), hy) for k, (hx, hy) in held.items()}
    data = _split(section.source, x, y, names, section.test_fraction, section.val_fraction, seed, held,
                  stratify=task == "classification")
    data.columns = columns
    if task == "regression":
        data.task = task
        data.target_mean, data.target_std = labels.scale(data.y_train.numpy())
    is_table = section.source not in ("digits", "synthetic")
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
            f"is {values:,} values, about {_gib(need)} GiB while drawn, and this machine has "
            f"{_gib(memory)} GiB: ask for fewer data.synthetic_samples or classes, or a smaller shape")


def _gib(size: int) -> str:
    gib = size / 2**30
    return f"{gib:,.1f}" if gib < 1e5 else f"{gib:.1e}"


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


@dataclass
class _Table:
    """A table's features (float32), its raw label values and its feature columns' names."""
    x: np.ndarray
    labels: list
    features: list[str]
    label_type: object = None
    """The label column's arrow type."""
    columns: list[tuple[str, str]] | None = None
    """Scalar feature columns with their arrow types (None: one list column)."""


def read_table(path: str, label: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A Parquet or CSV table: a label column and numeric feature columns (or one list column);
    its features, its labels as class indices, and the class names (the label values, sorted)."""
    table = _read_labelled(path, label)
    classes = labels.classes(table.labels, path, label)
    return table.x, labels.encode(table.labels, classes), [str(c) for c in classes]


def _read_labelled(path: str, label: str, named: str = "data.source") -> _Table:
    from pipelines import tables

    table = tables.read(path, named)
    if table.num_rows == 0:
        raise DataError(f"data file {path!r} has no rows" + (
            f" (only a header: {', '.join(table.column_names)})" if table.column_names else ""))
    return labelled(table, path, label)


def labelled(table, path: str, label: str) -> _Table:
    """A pyarrow table's (or one batch's) features, labels and columns, checked: a label
    column of scalars without gaps, numeric features without NaN or infinity."""
    if label not in table.column_names:
        raise DataError(
            f"data file {path!r} has no label column {label!r} "
            f"(columns: {', '.join(table.column_names)}); set --label"
        )
    label_type = table.schema.field(label).type
    if _is_nested(label_type):
        raise DataError(f"data file {path!r}: label column {label!r} holds {label_type} values; a label "
                        "is one class per row (an integer, a string or a boolean)")
    feature_columns = [c for c in table.column_names if c != label]
    if not feature_columns:
        raise DataError(f"data file {path!r} has no feature columns beside {label!r}")
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float32 is refused below
        x = _features(path, table, feature_columns)
    if np.isnan(x).any():
        raise DataError(f"data file {path!r} has missing or NaN feature values")
    if np.isinf(x).any():
        raise DataError(f"data file {path!r} has infinite feature values (or values beyond float32's range)")
    values = table.column(label).to_pylist()
    if any(v is None or v != v for v in values):  # v != v: a float NaN
        raise DataError(f"data file {path!r} has missing values in label column {label!r}")
    scalar = not _is_list(table.schema.field(feature_columns[0]).type)
    columns = [(c, str(table.schema.field(c).type)) for c in feature_columns] if scalar else None
    return _Table(x, values, feature_columns, label_type, columns)


def _read_held_out(path: str, named: str, section: DataSection, train: _Table,
                   classes: list | None) -> tuple[np.ndarray, np.ndarray]:
    """A validation or test table, checked against the training one: the same feature
    columns (names, order, values per example), and only labels the training data has (the
    classes, like the standardisation, are the training split's); `classes` None: the
    labels are regression targets."""
    table = _read_labelled(path, section.label, named)
    if table.features != train.features or table.x.shape[1:] != train.x.shape[1:]:
        def described(t: _Table) -> str:  # a list column: its length too
            return ", ".join(t.features) + (f" ({t.x.shape[1]} values)" if len(t.features) == 1 else "")

        theirs, ours = described(table), described(train)
        raise DataError(f"{named} {path!r} has feature columns {theirs}, but data.source "
                        f"{section.source!r} has {ours}: both must hold the same features")
    if classes is None:  # a regression target
        return table.x, labels.targets(table.labels, path, section.label)
    labels.check_known(table.labels, classes, named, path, section.label, section.source)
    return table.x, labels.encode(table.labels, classes)


def _features(path: str, table, feature_columns: list[str]) -> np.ndarray:
    """The feature matrix (float32) of numeric columns, or of one column of numeric lists."""
    if len(feature_columns) == 1 and _is_list(table.schema.field(feature_columns[0]).type):
        column = table.column(feature_columns[0]).combine_chunks()
        try:
            return np.array(column.to_pylist(), dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(
                f"data file {path!r}: list column {feature_columns[0]!r} must hold numeric "
                "lists of one length"
            ) from None
    bad = [c for c in feature_columns if not _is_numeric(table.schema.field(c).type)]
    if bad:
        raise DataError(f"data file {path!r} has non-numeric feature columns: {', '.join(bad)}")
    return np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in feature_columns],
                    axis=1).astype(np.float32)


def _is_numeric(t) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t)


def _is_list(t) -> bool:
    import pyarrow.types as pat

    return pat.is_list(t) or pat.is_large_list(t) or pat.is_fixed_size_list(t)


def _is_nested(t) -> bool:
    import pyarrow.types as pat

    return pat.is_nested(t) or pat.is_map(t)


def _reshape(x: np.ndarray, shape: list[int], source: str) -> np.ndarray:
    features = math.prod(x.shape[1:])
    wanted = math.prod(shape)  # Python ints: np.prod of huge sizes wraps around to 0
    if features != wanted:
        raise DataError(
            f"data.input_shape {list(shape)} holds {wanted} values but each example of "
            f"{source} has {features} features"
        )
    return x.reshape(len(x), *shape)


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

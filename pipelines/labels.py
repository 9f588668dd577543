"""A table's label column: classes to predict, or a real-valued target to regress.

`data.task` decides; left unset, a float column is a target (a price, a temperature) and
integer, string and boolean columns hold classes. Classes are the training table's distinct
values, sorted (a class's index is its place); a held-out table may hold only those. A
target is used as float32; its scale is the model's (`models.targets`).
"""
from __future__ import annotations

import numpy as np

from pipelines.errors import DataError


def task_of(label_type, asked: str | None, path: str, label: str) -> str:
    """The run's task for a label column of arrow type `label_type`."""
    import pyarrow.types as pat

    numeric = pat.is_integer(label_type) or pat.is_floating(label_type)
    if asked == "regression" and not numeric:
        raise DataError(f"data file {path!r}: data.task regression needs a numeric label column, but "
                        f"{label!r} holds {label_type} values (set data.task: classification)")
    return asked or ("regression" if pat.is_floating(label_type) else "classification")


def classes(labels: list, path: str, label: str) -> list:
    """The table's classes: its distinct label values, sorted."""
    found = sorted(set(labels))
    if len(found) < 2:
        raise DataError(f"data file {path!r}: label column {label!r} holds fewer than 2 classes "
                        f"(only {found[0]!r})")
    return found


def encode(values, known: list) -> np.ndarray:
    """Each label's index in `known` (the sorted classes, holding every one of `values`),
    vectorised: a list or numpy array; text compared as Python objects, so a class longer
    than every label at hand is not cut to their length."""
    values = np.asarray(values)
    text = values.dtype.kind in "USO"
    ordered = np.asarray(known, dtype=object if text else values.dtype)
    return np.searchsorted(ordered, values.astype(object) if text else values).astype(np.int64)


def check_known(labels: list, known: list, named: str, path: str, label: str, source: str) -> None:
    """A held-out table's labels are classes the training table has."""
    have = set(known)
    unknown = sorted({v for v in labels if v not in have}, key=repr)
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise DataError(f"{named} {path!r}: label column {label!r} holds {shown}, which the "
                        f"training data (data.source {source!r}) does not: a model learns its "
                        "classes from the training data")


def targets(labels: list, path: str, label: str) -> np.ndarray:
    """A regression target as float32; a value beyond float32's range is refused."""
    with np.errstate(over="ignore"):
        y = np.asarray(labels, dtype=np.float64).astype(np.float32)
    if not np.isfinite(y).all():
        raise DataError(f"data file {path!r}: label column {label!r} holds infinite values (or values "
                        "beyond float32's range)")
    return y


def check_spread(y: np.ndarray, path: str, label: str) -> None:
    """A target to regress takes more than one value."""
    if len(y) and (y == y[0]).all():
        raise DataError(f"data file {path!r}: label column {label!r} holds one value ({float(y[0])!r}): "
                        "there is nothing to regress")


def scale(y_train: np.ndarray) -> tuple[float, float]:
    """The training target's mean and standard deviation, summed in float64."""
    y = np.asarray(y_train, dtype=np.float64)
    return float(y.mean()), float(y.std())

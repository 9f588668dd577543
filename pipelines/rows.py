"""A table's rows as a run uses them: numeric features (float32) and raw label values,
checked once for what no model can train on (missing values, text features, NaN or
infinity, nested labels). Shared by the whole-table read (`pipelines.data`) and the
streamed one (`pipelines.streaming`), which checks each batch the same way."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipelines import labels
from pipelines.errors import DataError

if TYPE_CHECKING:  # the config brings torch with the models, which a Ray Data task never needs
    from pipelines.config import DataSection


@dataclass
class Rows:
    """A table's features (float32), its raw label values and its feature columns' names."""
    x: np.ndarray
    labels: list
    features: list[str]
    label_type: object = None
    """The label column's arrow type."""
    columns: list[tuple[str, str]] | None = None
    """Scalar feature columns with their arrow types (None: one list column)."""


def read_labelled(path: str, label: str, named: str = "data.source") -> Rows:
    from pipelines import tables

    table = tables.read(path, named)
    if table.num_rows == 0:
        raise DataError(f"data file {path!r} has no rows" + (
            f" (only a header: {', '.join(table.column_names)})" if table.column_names else ""))
    return labelled(table, path, label)


def labelled(table, path: str, label: str) -> Rows:
    """A pyarrow table's (or one batch's) features, labels and columns, checked: a label
    column of scalars without gaps, numeric features without NaN or infinity."""
    if label not in table.column_names:
        raise DataError(
            f"data file {path!r} has no label column {label!r} "
            f"(columns: {', '.join(table.column_names)}); set --label"
        )
    label_type = table.schema.field(label).type
    if is_nested(label_type):
        raise DataError(f"data file {path!r}: label column {label!r} holds {label_type} values; a label "
                        "is one class per row (an integer, a string or a boolean)")
    feature_columns = [c for c in table.column_names if c != label]
    if not feature_columns:
        raise DataError(f"data file {path!r} has no feature columns beside {label!r}")
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float32 is refused below
        x = features(path, table, feature_columns)
    if np.isnan(x).any():
        raise DataError(f"data file {path!r} has missing or NaN feature values")
    if np.isinf(x).any():
        raise DataError(f"data file {path!r} has infinite feature values (or values beyond float32's range)")
    values = table.column(label).to_pylist()
    if any(v is None or v != v for v in values):  # v != v: a float NaN
        raise DataError(f"data file {path!r} has missing values in label column {label!r}")
    scalar = not is_list(table.schema.field(feature_columns[0]).type)
    columns = [(c, str(table.schema.field(c).type)) for c in feature_columns] if scalar else None
    return Rows(x, values, feature_columns, label_type, columns)


def read_held_out(path: str, named: str, section: DataSection, train: Rows,
                   classes: list | None) -> tuple[np.ndarray, np.ndarray]:
    """A validation or test table, checked against the training one: the same feature
    columns (names, order, values per example), and only labels the training data has (the
    classes, like the standardisation, are the training split's); `classes` None: the
    labels are regression targets."""
    table = read_labelled(path, section.label, named)
    if table.features != train.features or table.x.shape[1:] != train.x.shape[1:]:
        def described(t: Rows) -> str:  # a list column: its length too
            return ", ".join(t.features) + (f" ({t.x.shape[1]} values)" if len(t.features) == 1 else "")

        theirs, ours = described(table), described(train)
        raise DataError(f"{named} {path!r} has feature columns {theirs}, but data.source "
                        f"{section.source!r} has {ours}: both must hold the same features")
    if classes is None:  # a regression target
        return table.x, labels.targets(table.labels, path, section.label)
    labels.check_known(table.labels, classes, named, path, section.label, section.source)
    return table.x, labels.encode(table.labels, classes)


def features(path: str, table, feature_columns: list[str]) -> np.ndarray:
    """The feature matrix (float32, row-major) of numeric columns, or of one column of numeric lists."""
    return np.ascontiguousarray(feature_view(path, table, feature_columns))


def feature_view(path: str, table, feature_columns: list[str]) -> np.ndarray:
    """`features`, but numeric columns come as the transpose of a (columns, rows) array,
    each column cast straight into its row: 4 ms for 65,536 rows of 64 columns where
    stacking them row-major took 51 (measured). Row selections and `row_split.row_hash`
    read it in order; `np.ascontiguousarray` makes it row-major."""
    if len(feature_columns) == 1 and is_list(table.schema.field(feature_columns[0]).type):
        column = table.column(feature_columns[0]).combine_chunks()
        try:
            return np.array(column.to_pylist(), dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(
                f"data file {path!r}: list column {feature_columns[0]!r} must hold numeric "
                "lists of one length"
            ) from None
    bad = [c for c in feature_columns if not is_numeric(table.schema.field(c).type)]
    if bad:
        raise DataError(f"data file {path!r} has non-numeric feature columns: {', '.join(bad)}")
    out = np.empty((len(feature_columns), table.num_rows), dtype=np.float32)
    for row, name in zip(out, feature_columns):
        row[:] = table.column(name).to_numpy(zero_copy_only=False)
    return out.T


def is_numeric(t) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t)


def is_list(t) -> bool:
    import pyarrow.types as pat

    return pat.is_list(t) or pat.is_large_list(t) or pat.is_fixed_size_list(t)


def is_nested(t) -> bool:
    import pyarrow.types as pat

    return pat.is_nested(t) or pat.is_map(t)


def reshape(x: np.ndarray, shape: list[int], source: str) -> np.ndarray:
    features = math.prod(x.shape[1:])
    wanted = math.prod(shape)  # Python ints: np.prod of huge sizes wraps around to 0
    if features != wanted:
        raise DataError(
            f"data.input_shape {list(shape)} holds {wanted} values but each example of "
            f"{source} has {features} features"
        )
    return x.reshape(len(x), *shape)



"""Sequences as a run's `Dataset`: generated (`data.source: lgssm` or `healing-digits`) or a
table's column of them (`data.sequences.column`).

A batch of sequences is (x, mask): the mask of observed steps rides in the label's place,
so every strategy shards, batches and moves it like a label. The splits are shuffled by the
seed (sequences have no classes to stratify by). For `lgssm`, the generator's exact Kalman
filter gives the limit no model can beat, logged beside the model's own test metrics as
`val_kalman_nll_per_step` and `test_kalman_nll_per_step`; the test split's true hidden
states come along for the figure of true against inferred trajectories.
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines import rows, sequences, split, tables
from pipelines.config import DataSection
from pipelines.dataset import Dataset
from pipelines.errors import DataError


def from_table(section: DataSection) -> sequences.SequenceData:
    """The sequences of a table's `data.sequences.column`: one row per sequence, a list of
    steps, each step a list of the same number of values; shorter sequences are padded with
    zeros and masked after their last step."""
    import pyarrow as pa

    table, name, shown = tables.read(section.source), section.sequences.column, section.source
    if name not in table.column_names:
        raise DataError(f"data.sequences.column {name!r} is not a column of {shown!r} "
                        f"(its columns: {', '.join(table.column_names)})")
    column = table.column(name).combine_chunks()
    kind = column.type
    if not (rows.is_list(kind) and rows.is_list(kind.value_type) and rows.is_numeric(kind.value_type.value_type)):
        raise DataError(f"data.sequences.column {name!r} of {shown!r} must hold lists of steps, each a list "
                        f"of numbers (list<list<float>>), got {kind}")
    steps = column.flatten()
    if column.null_count or steps.null_count or steps.flatten().null_count:
        raise DataError(f"data.sequences.column {name!r} of {shown!r} holds nulls: give every step its values")
    lengths = np.asarray(pa.compute.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int64)
    widths = np.unique(pa.compute.list_value_length(steps).to_numpy(zero_copy_only=False))
    if len(widths) != 1 or widths[0] < 1 or lengths.min() < 1:
        raise DataError(f"data.sequences.column {name!r} of {shown!r}: every sequence needs at least one step "
                        f"and every step the same number of values (found {sorted(widths.tolist())[:5]})")
    values = steps.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, int(widths[0]))
    longest = int(lengths.max())
    observed = np.arange(longest)[None, :] < lengths[:, None]
    x = np.zeros((len(lengths), longest, int(widths[0])), dtype=np.float32)
    x[observed] = values  # row-major: sequence by sequence, step by step, as the column holds them
    if section.input_shape:
        x = rows.reshape(x.reshape(len(x) * longest, -1), section.input_shape, shown).reshape(
            len(x), longest, *section.input_shape)
    return sequences.SequenceData(x=x, mask=observed.astype(np.float32))


def generate(section: DataSection, seed: int) -> sequences.SequenceData:
    settings = section.sequences
    if settings.column:
        return from_table(section)
    if section.source == "lgssm":
        return sequences.lgssm_sequences(settings.samples, settings.steps, settings.state_dim,
                                         settings.obs_dim, seed)
    data = sequences.healing_digits(settings.steps, seed)
    side = sequences.DIGIT_SIDE
    data.x = data.x.reshape(len(data.x), settings.steps, side, side)  # frames stay images
    return data


def load(section: DataSection, seed: int) -> Dataset:
    data = generate(section, seed)
    try:
        rest, test = split.shuffle_split(len(data.x), section.test_fraction, seed)
        if section.val_fraction > 0:
            train, val = split.shuffle_split(len(rest), section.val_fraction, seed)
            train, val = rest[train], rest[val]
        else:
            train, val = rest, rest[:0]
    except ValueError as e:
        raise DataError(f"cannot split {section.source} into train/val/test: {e}") from None
    t = lambda a, rows: torch.from_numpy(np.ascontiguousarray(a[rows]))  # noqa: E731
    dataset = Dataset(section.source, t(data.x, train), t(data.mask, train), t(data.x, val),
                      t(data.mask, val), t(data.x, test), t(data.mask, test), class_names=[],
                      task="generative")
    if data.log_likelihood is not None:
        for which, rows in (("val", val), ("test", test)):
            if len(rows):
                steps = float(data.mask[rows].sum())
                dataset.reference[f"{which}_kalman_nll_per_step"] = float(-data.log_likelihood[rows].sum() / steps)
    if data.latents is not None:
        dataset.test_latents = t(data.latents, test)
    return dataset

"""A table streamed through Ray Data instead of read whole (`data.stream`).

The driver reads the files once, batch by batch (`scan`): it checks them as a whole-table
read would, assigns each row to train, validation or test by a hash of its values, and
keeps what a run needs before training: the training rows' count, classes and
standardisation statistics (float64 sums, combined batch by batch), and the validation
and test rows, which are held in memory (a table too big for that gives its own smaller
`--val-data`/`--test-data`). No process ever holds the training rows.

Training reads the files again in every epoch through Ray Data (`training_dataset`): the
files in an order drawn from the seed and the epoch (`FileShuffleConfig`), each batch
turned into standardised float32 features and encoded labels by the same functions the
in-memory path uses, the rows of other splits dropped by the same hash. Ray Data keeps the
order (`preserve_order`), so the same seed gives the same batches in every run, and
`allreduce` hands each worker its share through Ray Train's `get_dataset_shard`.

A row's split depends on its values only (features and label): not on file order, file
count or machine; duplicated rows land in the same split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pipelines.errors import DataError
from pipelines.row_split import part_of_hashes, row_hash, split_of, split_of_hashes

TASK_CPUS = 0.25
"""Logical CPUs each Ray Data read/prepare task asks for: training actors may hold every
CPU, and an embedded Ray reserves one more for data (`DATA_CPUS`)."""
DATA_CPUS = 1
"""Logical CPUs an embedded Ray adds for Ray Data when a run streams: with Ray Train's
workers holding every CPU, Ray Data would otherwise wait forever for one."""
BATCH_ROWS = 65_536
"""Rows per batch the driver's scan reads at once."""

@dataclass
class Moments:
    """Per-feature count, mean and sum of squared deviations, combined batch by batch
    (Chan et al.'s pairwise update: no cancellation on columns far from zero)."""
    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x = x.reshape(len(x), -1).astype(np.float64)
        n, mean = len(x), x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count)


@dataclass
class StreamedTable:
    """What the workers need to stream a table's training rows: picklable, small."""
    source: str
    files: object
    """`pipelines.tables.TableFiles`; None for a user's `dataset`."""
    label: str
    features: list[str]
    task: str
    classes: list | None
    mean: np.ndarray | None
    """Float32 standardisation (None: features used as they are)."""
    std: np.ndarray | None
    input_shape: list[int] | None
    test_fraction: float
    val_fraction: float
    """The hash split's fractions: 0 for a split given as a table of its own."""
    rows: int = 0
    """Training rows."""
    dataset: object = None
    """A user's `ray.data.Dataset` of the table's columns, read in its own order."""

    def training_dataset(self, seed: int, on_driver: bool, part: tuple[int, int] = (0, 1),
                         epoch: int | None = None):
        """The training rows as a Ray Dataset of {"x", "y"}, read `on_driver` (`local`) or
        by an actor (Ray Train's split coordinator, a `ps` worker, a pipeline stage).

        Files come in an order drawn from `seed` and `epoch`, or, without `epoch`, from
        `seed` and the execution number (a Dataset Ray Train reads once per epoch). `part`
        (rank, parts) keeps one part of the rows: with at least `parts` files, every
        `parts`-th file from `rank` on (each file read once by one reader); with fewer, the
        rows whose hash falls in the part (each reader reads every file)."""
        import ray.data
        from ray.data import FileShuffleConfig

        set_data_context(on_driver)  # a dataset carries the context it was made in, to the split too
        rank, parts = part
        if self.dataset is not None:
            self.dataset.context.execution_options.preserve_order = True
            self.dataset.context.enable_progress_bars = not on_driver
            return self.dataset.map_batches(_Prepare(self, part), batch_format="pyarrow", num_cpus=TASK_CPUS)
        paths, rows_part = self.files.paths, part
        if parts > 1 and len(paths) >= parts:
            paths, rows_part = paths[rank::parts], (0, 1)
        shuffle = (FileShuffleConfig(seed=seed, reseed_after_execution=True) if epoch is None else
                   FileShuffleConfig(seed=(seed * 100_003 + epoch) % 2 ** 31))
        read = ray.data.read_parquet if self.files.format == "Parquet" else ray.data.read_csv
        dataset = read(paths, filesystem=self.files.filesystem, num_cpus=TASK_CPUS, shuffle=shuffle)
        return dataset.map_batches(_Prepare(self, rows_part), batch_format="pyarrow", num_cpus=TASK_CPUS)


class _Prepare:
    """A batch of raw rows -> the training rows' standardised features and labels."""

    def __init__(self, table: StreamedTable, part: tuple[int, int] = (0, 1)):
        self.table, self.part = table, part

    def __call__(self, batch) -> dict[str, np.ndarray]:
        from pipelines import labels, rows

        t = self.table
        x = rows.feature_view(t.source, batch, t.features)  # made row-major once, of the kept rows
        values = label_array(batch, t.label)
        hashes = row_hash(x, values)
        keep = split_of_hashes(hashes, t.test_fraction, t.val_fraction) == 0
        rank, parts = self.part
        if parts > 1:
            keep &= part_of_hashes(hashes, parts) == rank
        x, values = x[keep], values[keep]
        y = (values.astype(np.float32) if t.task == "regression" else labels.encode(values, t.classes))
        if t.mean is not None:
            x = (x - t.mean) / t.std
        if t.input_shape:
            x = x.reshape(len(x), *t.input_shape)
        return {"x": np.ascontiguousarray(x, dtype=np.float32), "y": y}


def label_array(batch, label: str) -> np.ndarray:
    """A batch's label column as numpy (strings as objects): no Python list per row."""
    return batch.column(label).to_numpy(zero_copy_only=False)


@dataclass
class Scan:
    """What the driver's pass over the files found."""
    moments: Moments = field(default_factory=Moments)
    labels: set = field(default_factory=set)
    held: dict = field(default_factory=lambda: {1: ([], []), 2: ([], [])})
    """Validation (1) and test (2) rows: feature arrays and label values."""
    held_bytes: int = 0


def dataset_batches(dataset):
    """A user's Ray Dataset's batches, as pyarrow Tables, read on this process."""
    set_data_context(on_driver=True)
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False
    yield from dataset.iter_batches(batch_size=BATCH_ROWS, batch_format="pyarrow")


def batches(files):
    """The table's record batches, file by file, as one-batch pyarrow Tables."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipelines.tables import check_schema, shown_path

    first = None
    for path in files.paths:
        try:
            if files.format == "Parquet":
                reader = pq.ParquetFile(path, filesystem=files.filesystem)
                schema, parts = reader.schema_arrow, reader.iter_batches(batch_size=BATCH_ROWS)
            else:
                reader = pacsv.open_csv(files.filesystem.open_input_stream(path),
                                        read_options=pacsv.ReadOptions(block_size=1 << 24))
                schema, parts = reader.schema, reader
            first = first or (path, schema)
            check_schema(files.source, first, path, schema)
            for part in parts:
                yield pa.Table.from_batches([part])
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"data file {shown_path(files.source, path)!r} is not a readable {files.format} "
                            f"file: {str(e).splitlines()[0]}") from None


def embedded_cpus(run) -> int | None:
    """The CPUs an embedded Ray gets for `run`: the machine's (or `resources.num_cpus`),
    and `DATA_CPUS` more for Ray Data when the run streams (a cluster keeps its own)."""
    cpus = run.resources.num_cpus
    if not run.data.stream or run.resources.address:
        return cpus
    return (cpus or os.cpu_count() or 1) + DATA_CPUS


def data_shortfall(run, bundles: list[dict], available: dict) -> str | None:
    """On a cluster, a streamed run needs `DATA_CPUS` beside its actors' CPUs (Ray Data
    would wait forever for one); the one-line reason when the cluster lacks them."""
    if not run.data.stream:
        return None
    need = sum(b.get("CPU", 0.0) for b in bundles) + DATA_CPUS
    have = available.get("CPU", 0.0)
    if need <= have:
        return None
    return (f"data.stream: Ray Data needs {DATA_CPUS} CPU beside the {need - DATA_CPUS:g} of the run's actors, "
            f"and the Ray cluster has {have:g}: lower resources.workers or cpus_per_worker, or add a node")


class Streamed:
    """A worker's training rows from a streamed table: `InMemory`'s `epoch`.

    Over `rows` (Ray Train's `get_dataset_shard`), or over `table`'s rows read afresh in
    each epoch (its files in that epoch's order) by this process (`on_driver`) or actor,
    `part` of them. Over rows of this worker's own, each batch holds global_batch / world
    rows. `whole`: over every training row, each batch is a global batch of which this
    worker takes rows rank, rank + world, ... as `InMemory` does, so that workers reading
    the same stream (a pipeline's first and last stages, its replicas) see the same
    batches, whose count is known ahead (`loop.steps_per_epoch` of the table's rows).

    Ray Data hands out `shuffle_rows` rows at a time (files in their epoch's order); each
    chunk, with what the last one left, is permuted (seeded from seed, epoch and rank) and
    cut into batches. The epoch's last partial batch is dropped."""

    def __init__(self, rows=None, *, table: StreamedTable | None = None, on_driver: bool = False,
                 part: tuple[int, int] = (0, 1), whole: bool = False, shuffle_rows: int = 4096):
        self.rows, self.table, self.on_driver, self.part = rows, table, on_driver, part
        self.whole, self.shuffle_rows = whole, shuffle_rows

    def epoch(self, global_batch: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
              cap: int | None = None, device="cpu"):
        import torch

        rows = self.rows if self.rows is not None else self.table.training_dataset(
            seed, self.on_driver, self.part, epoch)
        size = global_batch if self.whole else global_batch // world
        chunk = max(self.shuffle_rows, size)
        generator = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + (0 if self.whole else rank))
        step, held = 0, None
        # Per training batch, Ray Data's iterator and shuffle buffer cost more than a small step.
        for block in rows.iter_torch_batches(batch_size=chunk, drop_last=False):
            x, y = block["x"], block["y"]
            if held is not None:
                x, y = torch.cat([held[0], x]), torch.cat([held[1], y])
            order = torch.randperm(len(y), generator=generator)
            x, y = x[order], y[order]
            full = len(y) // size * size
            for start in range(0, full, size):
                if cap is not None and step >= cap:
                    return
                xb, yb = x[start:start + size], y[start:start + size]
                if self.whole and world > 1:
                    xb, yb = xb[rank::world], yb[rank::world]
                yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                step += 1
            held = (x[full:], y[full:])


def set_data_context(on_driver: bool) -> None:
    """Ray Data hands out rows in the order the files are read in, in blocks of at most
    `BLOCK_BYTES`, and keeps its progress and per-epoch execution lines to its log files
    (`--verbose` shows them): no bars on this terminal, and an actor's progress logged (at
    INFO) rather than drawn with tqdm."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.target_max_block_size = BLOCK_BYTES
    context.enable_progress_bars = not on_driver
    context.use_ray_tqdm = False
    if os.environ.get("RAY_DATA_LOG_LEVEL") == "WARNING":  # quiet, as `cluster.connect` sets it
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"


BLOCK_BYTES = 8 << 20
"""Ray Data's largest block (its default is 128 MiB). A read task hands a block on once it
is full, so with the default a file of one 128 MB row group reached the first training batch
only when it had been read and prepared whole, while the other files' reads took the same
cores: on 2 cores, 0.5 GB in four files, the first batch of an epoch came after 19.5 s (a
fresh Ray) and 6.3 s (the next epoch) with 128 MiB, 8.0 and 1.8 s with 8 MiB, and the
stream then ran at 100-260k rows/s, far above what training takes (measured 2026-12-07:
`Streamed.epoch`, 3,000 batches of 64, on the table of `benchmarks/ingest.py --sizes 0.5`)."""
HELD_SHARE = 4
"""The validation and test rows a scan keeps may take at most 1/HELD_SHARE of memory."""


def load(section, seed: int = 0, dataset=None):
    """A `pipelines.data.Dataset` whose training rows stay on disk (`Dataset.stream`),
    from one pass over the table's files (or over a user's `ray.data.Dataset`); its
    validation and test splits are in memory."""
    import torch

    from pipelines import labels, rows, tables
    from pipelines.dataset import Dataset
    from pipelines.memory import gib, machine_memory

    files = tables.find(section.source) if dataset is None else None
    test_fraction = 0.0 if section.test_source else section.test_fraction
    val_fraction = 0.0 if section.val_source or not section.val_fraction else section.val_fraction
    scan, first, task, targets = Scan(), None, None, Moments()
    limit = machine_memory() // HELD_SHARE
    parts = batches(files) if dataset is None else dataset_batches(dataset)
    for batch in parts:
        table = rows.labelled(batch, section.source, section.label)
        if first is None:
            first = table
            task = labels.task_of(table.label_type, section.task, section.source, section.label)
        values = label_array(batch, section.label)
        which = split_of(table.x, values, test_fraction, val_fraction)
        train = which == 0
        scan.moments.add(table.x[train])
        if task == "regression":
            targets.add(labels.targets(values[train], section.source, section.label)[:, None])
        else:
            scan.labels.update(np.unique(values[train]).tolist())
        for k in (1, 2):
            mask = which == k
            scan.held[k][0].append(table.x[mask])
            scan.held[k][1].extend(values[mask].tolist())
            scan.held_bytes += table.x[mask].nbytes
        if scan.held_bytes > limit:
            raise DataError(f"the validation and test rows drawn from {section.source!r} exceed "
                            f"{gib(limit)} GiB (a quarter of this machine's memory): give data.val_source "
                            "and data.test_source tables that fit in memory, or lower data.val_fraction/test_fraction")
    if first is None or scan.moments.count == 0:
        raise DataError(f"data file {section.source!r} has no rows" if first is None else
                        f"data.source {section.source!r}: no row falls in the training split")
    classes = None
    if task == "regression":
        if targets.m2[0] == 0:
            raise DataError(f"data file {section.source!r}: label column {section.label!r} holds one value "
                            f"({float(targets.mean[0])!r}): there is nothing to regress")
    else:
        classes = labels.classes(list(scan.labels), section.source, section.label)
    held = {}
    for k, which in ((1, "val"), (2, "test")):
        given = getattr(section, f"{which}_source")
        if given:
            held[which] = rows.read_held_out(given, f"data.{which}_source", section, first, classes)
            continue
        xs, values = scan.held[k]
        x = np.concatenate(xs) if xs else first.x[:0]
        y = (labels.targets(values, section.source, section.label) if classes is None else
             labels.check_known(values, classes, f"data.{which}_source", section.source, section.label,
                                section.source) or labels.encode(values, classes))
        held[which] = (x, y)
    standardize = True if section.standardize is None else section.standardize
    mean = scan.moments.mean.astype(np.float32) if standardize else None
    std = np.where(scan.moments.std() > 0, scan.moments.std(), 1.0).astype(np.float32) if standardize else None
    shape = list(section.input_shape) if section.input_shape else None
    t = torch.from_numpy

    def ready(x: np.ndarray) -> torch.Tensor:
        x = (x - mean) / std if mean is not None else x
        x = rows.reshape(x, shape, section.source) if shape else x
        return t(np.ascontiguousarray(x, dtype=np.float32))

    (x_val, y_val), (x_test, y_test) = held["val"], held["test"]
    empty = ready(first.x[:0])
    result = Dataset(section.source, empty, t(np.zeros(0, np.float32 if classes is None else np.int64)),
                     ready(x_val), t(np.asarray(y_val)), ready(x_test), t(np.asarray(y_test)),
                     [str(c) for c in classes] if classes is not None else [],
                     feature_mean=t(mean).reshape(empty.shape[1:]) if mean is not None else None,
                     feature_std=t(std).reshape(empty.shape[1:]) if std is not None else None,
                     columns=first.columns)
    if task == "regression":
        result.task, result.target_mean, result.target_std = task, float(targets.mean[0]), float(targets.std()[0])
    result.stream = StreamedTable(section.source, files, section.label, first.features, task, classes, mean, std,
                                  shape, test_fraction, val_fraction, scan.moments.count, dataset)
    return result

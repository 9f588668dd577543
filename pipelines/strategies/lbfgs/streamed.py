"""A streamed table's rows for L-BFGS portions (`data.stream`): read from the files at each
evaluation, a chunk at a time, so that no worker holds more than a chunk of the table.

Portion p of P is one part of the training rows, as a `ps` worker's part is: every P-th file
from p on where there are at least P files, else the rows whose hash falls in part p (every
portion reads every file). Its rows come in file order and a file's own order, the same at
every evaluation and on every worker, so an evaluation's gradient is a fixed sum: the same
run twice takes the same bits. Each chunk adds its loss times its rows over the objective's
rows, the share `worker.py` gives an in-memory portion; the objective is every training row.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from pipelines.streaming import StreamedTable, _Prepare, batches, dataset_batches


def portion_chunks(table: StreamedTable, portion: int, portions: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of portion `portion` of `portions`, chunk by chunk, in a fixed order."""
    if table.dataset is not None:  # a user's ray.data.Dataset: read here, in its own order
        raw, part = dataset_batches(table.dataset), (portion, portions)
    else:
        paths, part = table.files.paths, (portion, portions)
        if portions > 1 and len(paths) >= portions:
            paths, part = paths[portion::portions], (0, 1)
        raw = batches(dataclasses.replace(table.files, paths=paths))
    prepare = _Prepare(table, part)
    for chunk in raw:
        rows = prepare(chunk)
        if len(rows["y"]):
            yield torch.from_numpy(rows["x"]), torch.from_numpy(rows["y"])

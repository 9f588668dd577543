"""Where a `ps` run was between its epoch checkpoints, so that `--resume` loses minutes, not an epoch.

The shards snapshot themselves every `snapshot_every` updates (`shard.py`); the driver keeps
beside those snapshots, at every poll, what the coordinator knows: each worker's clock and
position in the data, and the reports of the epochs not checkpointed yet. A run resumed
after its driver died (SIGKILL, a lost head node) then starts each shard from whichever of
its snapshot and the epoch checkpoint is newer, and each worker where it was. That is
exactly what a restarted shard or worker does inside a run (Downpour's own recovery): the
updates after a shard's last snapshot are lost, and the steps a worker made after the last
poll are taken again. Without the file (a run that crashed before its first poll, a
different machine's staging directory) the run resumes from the epoch checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipelines.strategies.ps.shard import snapshot_file

PROGRESS_FILE = "progress.json"


def save(snapshot_dir: Path, report: dict) -> None:
    """Keep the coordinator's `report` (clocks, positions, pending epoch reports); atomic."""
    record = {"clocks": report["clocks"], "positions": report["positions"],
              "epochs": report["epochs"]}
    partial = snapshot_dir / f".{PROGRESS_FILE}.tmp"
    partial.write_text(json.dumps(record))
    os.replace(partial, snapshot_dir / PROGRESS_FILE)


def load(snapshot_dir: Path, start_epoch: int) -> dict | None:
    """What `save` kept, with integer keys again and positions before `start_epoch` (the
    epoch after the checkpoint) moved up to it; None if there is nothing usable."""
    try:
        record = json.loads((snapshot_dir / PROGRESS_FILE).read_text())
        clocks = {int(rank): int(clock) for rank, clock in record["clocks"].items()}
        positions = {}
        for rank, (epoch, step) in record["positions"].items():
            positions[int(rank)] = (epoch, step) if epoch >= start_epoch else (start_epoch, 0)
        epochs = {int(e): {int(rank): stats for rank, stats in reports.items()}
                  for e, reports in record["epochs"].items() if int(e) >= start_epoch}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"clocks": clocks, "positions": positions, "epochs": epochs}


def fresher_snapshot(snapshot_dir: Path, index: int, checkpointed: dict | None) -> int | None:
    """The version of shard `index`'s snapshot if it holds more updates than the checkpoint's
    state of that shard (`checkpointed`); it is then marked to start as a first start."""
    path = snapshot_file(snapshot_dir, index)
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - missing or damaged: the checkpoint serves
        return None
    if state.get("version", 0) <= (checkpointed or {}).get("version", 0):
        return None
    state["incarnation"] = -1  # a resumed run's first start, not a crash of this run's shard
    partial = path.with_suffix(".resumed.tmp")
    torch.save(state, partial)
    os.replace(partial, path)
    return state["version"]

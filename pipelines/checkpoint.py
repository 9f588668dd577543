"""Per-epoch checkpoints: one directory per epoch holding model and optimizer state."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
_NAME = re.compile(r"^checkpoint_epoch_(\d+)$")


def directory_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:05d}"


def save(directory: str | Path, *, epoch: int, model: dict, optimizer: dict,
         extra: dict[str, Any] | None = None) -> Path:
    """Write the state reached at the end of `epoch` (0-based) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "model": model, "optimizer": optimizer, "extra": extra or {}},
               directory / STATE_FILE)
    return directory


def load(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def load_latest(run_dir: str | Path) -> dict[str, Any] | None:
    """The state of the highest epoch under `run_dir` that loads whole, if any.

    A process killed while copying a checkpoint can leave a truncated file; the one before
    it is then the newest usable state. `run_dir` may be an object-store URI.
    """
    from pipelines import object_store

    if object_store.is_uri(run_dir):
        return object_store.load_state(str(run_dir), STATE_FILE)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted(((int(m.group(1)), child) for child in run_dir.iterdir()
                    if (m := _NAME.match(child.name)) and (child / STATE_FILE).is_file()),
                   reverse=True)
    for _, directory in found:
        try:
            return load(directory)
        except Exception:  # noqa: BLE001 - a partial file of any kind: try the one before
            continue
    return None

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


def latest(run_dir: str | Path) -> Path | None:
    """The checkpoint of the highest epoch under `run_dir`, if any holds a state file."""
    best: tuple[int, Path] | None = None
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    for child in run_dir.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            epoch = int(match.group(1))
            if best is None or epoch > best[0]:
                best = (epoch, child)
    return best[1] if best else None

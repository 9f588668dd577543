"""Where runs and sweeps are kept: a local directory or an object-store URI, one code path.

A `Store` is the `resources.storage_path` (a path, or `s3://`, `gs://`, any URI pyarrow's
filesystems open); it finds runs and sweeps by name for `--resume` and opens a `RunDir`
for each. A `RunDir` holds one run's (or one sweep's) marker file and its per-epoch
checkpoints. Strategies write into its `local` directory with ordinary file operations: for
a local store that is the run's directory itself; on an object store it is a *staging*
directory on the driver's node (as Ray Train does), and each whole checkpoint is uploaded
once saved. Listing, the resume lookup and the newest loadable checkpoint go through
pyarrow's filesystem for both kinds, so they are written once.

Paths and URIs are opened through `pipelines.filesystem`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.errors import first_line, redact
from pipelines.filesystem import (
    CHUNK,
    check_reachable,
    children,
    exists,
    is_uri,
    join,
    kind,
    open_filesystem,
    read_bytes,
    write_text,
)

RUN_FILE = "raydeep_run.json"
SWEEP_FILE = "raydeep_sweep.json"
STATE_FILE = "state.pt"
COMPLETE_FILE = "complete.json"
"""Written last into a checkpoint, with its state file's size and SHA-256: a checkpoint
without it (a crash mid-write, an upload cut short) is not one, and a state file that does
not match it (a damaged disk, a partial copy) is skipped for the one before."""
_CHECKPOINT = re.compile(r"^checkpoint_epoch_(\d+)$")


# --- one checkpoint: a directory per epoch holding model and optimizer state -------------

def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:05d}"


def save_state(directory: str | Path, *, epoch: int, model: dict, optimizer: dict,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the state reached at the end of `epoch` (0-based) into `directory`: to a
    temporary name, flushed to disk, renamed, then the completion record."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"epoch": epoch, "model": model, "optimizer": optimizer, "extra": extra or {}}, buffer)
    raw = buffer.getvalue()
    _write_durably(directory / STATE_FILE, raw)
    _write_durably(directory / COMPLETE_FILE, json.dumps(
        {"epoch": epoch, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}).encode())
    return directory


def _write_durably(path: Path, raw: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(partial, "wb") as out:
        out.write(raw)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def load_state(directory: str | Path) -> dict[str, Any]:
    """The state in checkpoint `directory`: tensors and plain values only (`weights_only`),
    so a file planted in shared storage cannot run code when a run resumes from it."""
    return _loads((Path(directory) / STATE_FILE).read_bytes())


def _loads(raw: bytes) -> dict[str, Any]:
    import torch

    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def checkpoints(location: str) -> list[tuple[int, str]]:
    """(epoch, directory name) of the checkpoint directories under run `location`, newest
    first, complete or not."""
    return sorted(((int(m.group(1)), name) for name, _ in children(location)
                   if (m := _CHECKPOINT.match(name))), reverse=True)


def complete_checkpoints(location: str) -> list[tuple[int, str]]:
    """The checkpoints under run `location` whose completion record is there, newest first."""
    return [(epoch, name) for epoch, name in checkpoints(location)
            if exists(join(location, name, COMPLETE_FILE))]


def newest_state(location: str) -> dict[str, Any] | None:
    """The state of the newest checkpoint under run `location` that is whole, if any.

    A crash while writing or uploading a checkpoint, or a damaged file, leaves one that does
    not match its completion record; the one before it is then the newest usable state. On
    an object store it is read straight from there.
    """
    for _, name in checkpoints(location):
        try:
            raw = read_bytes(join(location, name, STATE_FILE))
            if exists(join(location, name, COMPLETE_FILE)):
                record = json.loads(read_bytes(join(location, name, COMPLETE_FILE)))
                if record["bytes"] != len(raw) or record["sha256"] != hashlib.sha256(raw).hexdigest():
                    continue
            return _loads(raw)
        except Exception:  # noqa: BLE001 - missing, partial or damaged: try the one before
            continue
    return None


# --- a run's (or a sweep's) directory ------------------------------------------------------

@dataclass
class RunDir:
    """One run's or sweep's directory. Holds only strings and numbers: it travels to the
    workers of a Ray job (Ray Train's write there themselves)."""

    name: str
    local: Path
    """Where this process writes: the run's directory, or its staging copy."""
    remote: str = ""
    """The directory's URI on an object store (empty: `local` is the storage)."""
    keep: int = 2
    """Checkpoints kept: older ones go once a newer one is whole."""

    @property
    def location(self) -> str:
        """Where the run is stored: its URI, or its local path."""
        return self.remote or str(self.local)

    def write_json(self, file: str, value: dict) -> None:
        """Write a marker here and on the store, URI passwords hidden: markers are copied to
        buckets and staging folders others can read."""
        text = redact(json.dumps(value, indent=1))
        (self.local / file).write_text(text)
        if self.remote:
            write_text(join(self.remote, file), text)

    def read_json(self, file: str) -> dict:
        return Store(str(self.local.parent), marker=file).read_marker(self.name)

    def upload(self, file: str) -> None:
        """Copy `local/file` to the store (nothing to do for a local store)."""
        if self.remote:
            write_text(join(self.remote, file), (self.local / file).read_text())

    def save_checkpoint(self, epoch: int, *, model: dict, optimizer: dict,
                        extra: dict[str, Any] | None = None) -> Path:
        """Save the state at the end of `epoch`, upload it to the store, then prune: an
        older checkpoint goes only once this one is whole where it is kept."""
        saved = save_state(self.local / checkpoint_name(epoch), epoch=epoch, model=model,
                           optimizer=optimizer, extra=extra)
        if self.remote:
            self.upload_checkpoint(saved)
        self.prune()
        return saved

    def prune(self) -> None:
        """Keep the `keep` newest complete checkpoints, here and on the store; an incomplete
        one goes once a newer one is complete. Nothing newer than the newest complete one is
        touched (it may be one being written), and that one is never removed."""
        for location in filter(None, (str(self.local), self.remote)):
            complete = complete_checkpoints(location)
            if not complete:
                continue
            kept = {name for _, name in complete[:self.keep]}
            newest = complete[0][0]
            doomed = [name for epoch, name in checkpoints(location) if epoch < newest and name not in kept]
            if location == self.remote:
                fs, root = open_filesystem(location)
                for name in doomed:
                    fs.delete_dir(f"{root}/{name}")
            else:
                for name in doomed:
                    shutil.rmtree(self.local / name, ignore_errors=True)

    def newest_state(self) -> dict[str, Any] | None:
        return newest_state(self.location)

    def adopt(self, given: Path) -> None:
        """Make checkpoint directory `given` (Tune's copy of a trial's) this run's newest
        state; any later state of its own is dropped."""
        state = load_state(given)
        for _, old in checkpoints(str(self.local)):
            shutil.rmtree(self.local / old, ignore_errors=True)
        shutil.copytree(given, self.local / checkpoint_name(state["epoch"]))

    def ray_storage(self, inside: str | None = None) -> dict[str, Any]:
        """`storage_path`, `name` (and `storage_filesystem` on an object store) for Ray
        Train's or Tune's run config: what they write lands in this directory, or in its
        subdirectory `inside`."""
        fs, path = open_filesystem(self.location)
        parent, name = (path, inside) if inside else (path.rpartition("/")[0], self.name)
        return {"storage_path": parent, "name": name, **({"storage_filesystem": fs} if self.remote else {})}

    def upload_checkpoint(self, directory: Path) -> None:
        """Copy checkpoint `directory` to the store, its completion record last: until that
        is up, the store's copy is not a checkpoint."""
        import pyarrow.fs

        fs, root = open_filesystem(self.remote)
        target = f"{root}/{directory.name}"
        fs.create_dir(target)
        local = pyarrow.fs.LocalFileSystem()
        for file in sorted(directory.iterdir(), key=lambda f: f.name == COMPLETE_FILE):
            pyarrow.fs.copy_files(str(file), f"{target}/{file.name}", source_filesystem=local,
                                  destination_filesystem=fs, chunk_size=CHUNK)

    def download(self, names: list[str]) -> None:
        import pyarrow.fs

        fs, root = open_filesystem(self.remote)
        for name in names:
            destination = self.local / name
            if kind(fs, f"{root}/{name}") == pyarrow.fs.FileType.Directory:
                destination.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(f"{root}/{name}", str(destination), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem(), chunk_size=CHUNK)


# --- the store: runs and sweeps by name ------------------------------------------------------

class Store:
    """`resources.storage_path`: runs at its top, sweeps under `sweeps/`."""

    def __init__(self, location: str, what: str = "run", marker: str = RUN_FILE):
        self.location = location if is_uri(location) else str(Path(location).absolute())
        self.remote = is_uri(location)
        self.what, self.marker = what, marker

    @classmethod
    def sweeps(cls, storage_path: str) -> "Store":
        return cls(join(Store(storage_path).location, "sweeps"), "sweep", SWEEP_FILE)

    def check(self) -> None:
        """A one-line error unless the store can hold runs, said before a run starts, not in
        its middle: a local directory (made when the run opens) must be one and be writable;
        an object store's bucket must answer, within seconds."""
        if not self.remote:
            return check_local_directory(self.location)
        check_reachable(self.location, "resources.storage_path", "s3://BUCKET/runs")

    def find(self, name: str, prefix: str = "") -> str:
        """The name `--resume NAME` means: `name` itself, or for `latest` the newest (by its
        marker's time) whose name starts with `prefix`; each holds the marker file."""
        where = redact(self.location)
        if name != "latest":
            if not exists(join(self.location, name, self.marker)):
                raise ConfigError(f"--resume {name!r}: no {self.what} of that name under {where}")
            return name
        fs, _ = open_filesystem(self.location)
        found = []
        for child, path in children(self.location):
            if child.startswith(prefix):
                info = fs.get_file_info(f"{path}/{self.marker}")
                if info.type.name == "File":
                    found.append((info.mtime, child))
        if not found:
            raise ConfigError(f"--resume: no earlier {self.what} under {where}")
        return max(found)[1]

    def read_marker(self, name: str) -> dict[str, Any]:
        """The marker file of directory `name` (`find`'s answer), read where it is kept."""
        try:
            value = json.loads(read_bytes(join(self.location, name, self.marker)))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{name}: its {self.marker} is missing or damaged ({first_line(e)}); "
                              "it cannot be resumed") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: its {self.marker} is damaged (not a mapping); it cannot be resumed")
        return value

    def create(self, name: str, unique: bool = False) -> RunDir:
        """A new directory `name`, claimed by creating its marker file exclusively (two runs
        started in the same second cannot share it); taken already: refused, or with
        `unique` the next free `name-2`, `name-3`..."""
        for attempt in range(1, 1000):
            candidate = name if attempt == 1 else f"{name}-{attempt}"
            if self._claim(candidate):
                return RunDir(candidate, self._local(candidate),
                              join(self.location, candidate) if self.remote else "")
            if not unique:
                break
        key = "tracking.run_name" if self.what == "run" else f"{self.what} name"
        raise ConfigError(f"{key} {name!r} already has a {self.what} under "
                          f"{redact(self.location)}; pick another name or pass --resume to continue it")

    def _claim(self, name: str) -> bool:
        if self.remote:  # an object store has no exclusive create; one driver writes a run
            return not exists(join(self.location, name, self.marker))
        path = self._local(name)
        try:
            os.close(os.open(path / self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def reopen(self, name: str) -> RunDir:
        """An earlier directory (`find`'s answer); on an object store its marker and newest
        checkpoint are downloaded into a fresh staging directory first."""
        run_dir = RunDir(name, self._local(name), join(self.location, name) if self.remote else "")
        if self.remote:
            run_dir.download([self.marker, *(n for _, n in checkpoints(run_dir.remote)[:1])])
        return run_dir

    def _local(self, name: str) -> Path:
        if self.remote:  # a fresh staging directory; the uri's hash keeps two stores apart
            digest = hashlib.sha1(self.location.encode()).hexdigest()[:12]
            path = Path(tempfile.gettempdir()) / "raydeep_staging" / digest / name
            shutil.rmtree(path, ignore_errors=True)
        else:
            path = Path(self.location) / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"resources.storage_path {self.location!r} cannot hold "
                              f"{self.what}s: {e.strerror}") from None
        return path


def check_local_directory(location: str) -> None:
    """`location` is a directory this process can write in, or can be made as one: its
    nearest existing ancestor must be a directory a probe directory can be made in (a
    permission check alone says yes to root, even on a read-only or virtual filesystem)."""
    existing = Path(location)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"resources.storage_path {location!r}: {str(existing)!r} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(prefix=".raydeep-probe-", dir=existing).cleanup()
    except OSError as e:
        raise ConfigError(f"resources.storage_path {location!r} cannot be written "
                          f"({str(existing)!r}: {e.strerror})") from None


def timestamped(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"

"""A new SQLite MLflow store starts as a copy of an empty one MLflow built once.

MLflow builds a new SQLite store by running its schema migrations one by one: about 1.1 s
of CPU on this project's 2-core machines, paid by every run whose store is new (a fresh
directory, each test, each benchmark run). The migrations' result is the same file every
time for one MLflow version, so it is built once per machine and version, kept in the
user's cache, and copied. MLflow itself then opens the copy as it opens any up-to-date store
and adds its Default experiment, with this store's own artifact location, exactly as it does
for a store it has just migrated: the copy is the file MLflow would have made.

Anything unexpected (no cache directory, a file system without hard links, a private MLflow
function that moved) leaves the store to MLflow's own creation: this is only a shortcut.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "RAYDEEP_CACHE_DIR"
"""Where the empty stores are kept (default: $XDG_CACHE_HOME/raydeep or ~/.cache/raydeep)."""


def seed(path: str | os.PathLike) -> bool:
    """Make `path`, if it does not exist yet, a copy of an empty MLflow store; True if it did.

    Never replaces a file: the copy is published with a hard link, which fails if another
    process created the store in the meantime (its runs are kept)."""
    target = Path(path)
    if target.exists() or not target.parent.is_dir():
        return False
    try:
        empty = _empty_store()
        staged = Path(tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)[1])
        try:
            shutil.copyfile(empty, staged)
            shutil.copymode(empty, staged)  # as SQLite made it, not mkstemp's 0600
            os.link(staged, target)
        finally:
            staged.unlink(missing_ok=True)
    except FileExistsError:
        return False
    except Exception:  # noqa: BLE001 - MLflow then creates the store itself, as it always can
        return False
    return True


def _empty_store() -> Path:
    import mlflow

    cached = _cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if not cached.is_file():
        _build(cached)
    return cached


def _build(cached: Path) -> None:
    """MLflow's own migrations, run once into a file that is then renamed into place."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    cached.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(prefix=".building-", suffix=".db", dir=cached.parent)
    os.close(handle)
    try:
        os.unlink(staged)  # SQLite creates the file: an empty file is not a database
        engine = sqlalchemy.create_engine(f"sqlite:///{staged}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(staged, cached)
    finally:
        Path(staged).unlink(missing_ok=True)


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "raydeep"

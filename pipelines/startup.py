"""When this run was launched, and what the driver did before its MLflow run existed.

Every strategy's start-up timeline (Ray up, placement, actors, process group, first step)
is measured from one origin: the moment `raydeep run` started (`launched`, which the CLI
calls with its process's start time), or the start of a `pipelines.train(...)` call made
from Python. Marks taken before the tracker exists wait here until `pipelines.run` logs
them as `startup_<name>_s`. Only `time` is imported: the CLI calls this before anything heavy.
"""
from __future__ import annotations

import time

_launched: float | None = None
_marks: dict[str, float] = {}
"""name -> wall-clock time (time.time()) of the event."""


def launched(at: float | None = None) -> None:
    """Record the launch (default: now); a later call overrides it."""
    global _launched
    _launched = time.time() if at is None else at


def launch_time() -> float:
    """The recorded launch; recorded now if there is none yet."""
    if _launched is None:
        launched()
    return _launched


def mark(name: str) -> None:
    """Note that `name` happened now (driver side, before the run's tracker exists)."""
    launch_time()
    _marks[name] = time.time()


def marks() -> dict[str, float]:
    """Seconds from the launch to each mark, in the order they were taken."""
    origin = launch_time()
    return {name: at - origin for name, at in _marks.items()}


def forget() -> None:
    """Drop the launch and the marks: the next run in this process is a launch of its own."""
    global _launched
    _launched = None
    _marks.clear()

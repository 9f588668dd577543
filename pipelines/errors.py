"""One-line errors: what a user reads when something fails, and nothing it must not read.

A leaf module (standard library only): config, storage, tracking and the strategies all
word their errors with it.
"""
from __future__ import annotations

import re


class ConfigError(ValueError):
    """Input that cannot be run (a config, a file, a name); the message names the key and
    the value. `pipelines.config.ConfigError` is this class."""


class DataError(ConfigError):
    """Input data that cannot be trained on; the message names the file and the problem."""


class TrackingUnreachable(RuntimeError):
    """The tracking store stayed away longer than a run waits for it (`pipelines.backlog`):
    the run cannot be marked in it, and its checkpoints are kept for `--resume`."""


class InterruptedUnmarked(KeyboardInterrupt):
    """An interrupted run whose MLflow run could not be marked KILLED (the store is away):
    the message says so and how `--resume` ends it."""


_CREDENTIALS = re.compile(r"(\w+://)([^/@:\s]+):[^/@\s]+@")


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of `error`'s message (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line[:limit] if limit else line


def one_line(error: BaseException) -> str:
    """`Type: first line` of `error`, as a failed run's MLflow tag and the CLI say it."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def redact(text: str) -> str:
    """`text` with the password of any URI in it hidden (s3://KEY:SECRET@bucket -> s3://KEY:***@bucket):
    params are readable by everyone who can browse the runs."""
    return _CREDENTIALS.sub(r"\1\2:***@", text)


def raise_task_cause(error: BaseException) -> None:
    """Re-raise a Ray task error as the exception the task raised (a `ConfigError`, a
    `ValueError`...), so the run fails with the task's own one-line message."""
    cause = getattr(error, "cause", None)
    raise (cause if isinstance(cause, Exception) else error) from None


def quiet_numpy_views() -> None:
    """Actors turn NumPy arrays that Ray hands them read-only into tensors without a copy
    and never write to them: torch's warning about it is noise there."""
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

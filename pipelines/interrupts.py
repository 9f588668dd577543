"""Ctrl-C and SIGTERM held back while the main thread is inside a tracking-store write.

A KeyboardInterrupt raised in the middle of SQLAlchemy's commit can leave a pooled SQLite
connection checked out with its write transaction open: every later write of the process,
marking the run KILLED first, then finds the database locked until it gives up (seen in a
fresh-clone suite, 2026-12-07: "unreachable for 42 s", a run left RUNNING). The CLI installs
`handler` for both signals; a store call runs under `deferred()`, and an interrupt that came
during it is raised as the call returns, with the store's session closed cleanly.
"""
from __future__ import annotations

import contextlib
import threading

_depth = 0
_pending = False


def handler(signum, frame) -> None:
    """The signal handler: KeyboardInterrupt now, or as the current store call ends."""
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """Hold interrupts back for the main thread's store call (other threads' calls are never
    interrupted: signals reach the main thread only)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            _pending = False
            raise KeyboardInterrupt

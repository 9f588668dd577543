"""Writes to the tracking store that outlive an outage of it.

An MLflow server that stops answering mid-run must cost neither the epoch nor the run: the
checkpoint is written first anyway (`pipelines.context`), so what the store misses are
writes. A `Backlog` keeps the writes it could not send (metrics, params, tags), oldest
first, and sends them, in order, with the next write that finds the store back; training
goes on meanwhile. What must reach the store (reads, figures, the model, the run's end)
waits for it a bounded time (`RAYDEEP_TRACKING_WAIT_S`), then gives up in one line
(`TrackingUnreachable`): the checkpoints hold every epoch's metrics, and `--resume` logs
what the store missed.

Standard library only: the MLflow calls are the caller's (`pipelines.tracking.Tracker`).
"""
from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from typing import Any, Callable

from pipelines import interrupts
from pipelines.errors import ConfigError, TrackingUnreachable, redact

WAIT_ENV = "RAYDEEP_TRACKING_WAIT_S"
DEFAULT_WAIT_S = 60.0
"""How long the end of a run (and any read, figure or model) waits for an absent store."""

RETRY_EVERY_S = 5.0
"""While the store is away, how often a write tries it again (the others are only kept)."""

PROBE_TIMEOUT_S = 2.0
"""A server's port is tried first: a host that drops packets costs this, not MLflow's
timeouts, on every try."""

HTTP_DEFAULTS = {
    # MLflow's REST client retries 7 times with backoff factor 2 and a 120 s timeout: about
    # 4 minutes per call against a stopped server, with training stalled. Raydeep keeps
    # what a call could not write, so a call need not wait that long: 3 tries, 2-3 s of
    # backoff, 15 s per try against a host that does not answer. A value the user set wins.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def bound_http_waits(uri: str) -> None:
    """MLflow's HTTP retry settings for this process (a driver, a Ray worker), unless set."""
    if uri.lower().startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


def wait_seconds() -> float:
    """`RAYDEEP_TRACKING_WAIT_S`, checked (a `ConfigError` for a value that is no duration)."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{WAIT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def transient(error: BaseException) -> bool:
    """Whether `error` says the store is away (not that the write was wrong): no answer,
    a timeout, a 5xx or 429 after MLflow's own retries, a database that cannot be opened."""
    if isinstance(error, OSError):  # requests' ConnectionError and Timeout are OSErrors
        return True
    status = getattr(error, "get_http_status_code", None)
    if callable(status):  # an MlflowException: its error code's HTTP status
        try:
            code = int(status())
        except (TypeError, ValueError):
            return False
        return code >= 500 or code == 429
    return type(error).__name__ in ("OperationalError", "DisconnectionError")  # SQLAlchemy's


_AUTOFLUSH = re.compile(r"^\(raised as a result of Query-invoked autoflush;[^)]*\)\s*")
"""SQLAlchemy's preface to an error in a flush, ahead of the database's own words."""
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def reason(error: BaseException) -> str:
    """What went wrong, in a few words (MLflow's message holds the whole urllib3 chain)."""
    text = _AUTOFLUSH.sub("", str(error))
    found = _ERRNO.search(text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    if "too many" in text.lower() and "error responses" in text.lower():
        return "it answers with errors"
    lines = text.strip().splitlines()
    return lines[0][:160] if lines else type(error).__name__


def port_probe(uri: str) -> Callable[[], str | None]:
    """For a server URI, a check that its port accepts connections (the reason if not);
    for other stores, one that always passes (the write itself finds out)."""
    from urllib.parse import urlsplit

    scheme = uri.partition("://")[0].lower()
    if scheme not in ("http", "https"):
        return lambda: None
    parts = urlsplit(uri)
    address = (parts.hostname or "", parts.port or (443 if scheme == "https" else 80))

    def probe() -> str | None:
        try:
            socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
        except OSError as e:
            return e.strerror or str(e) or type(e).__name__
        return None

    return probe


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Backlog:
    """The writes one process could not send yet, oldest first, and the store's absence.

    `send(kind, payload)` writes one entry to the store; `probe()` says why the store
    cannot be reached (None: it may be); `say` tells the user (once when the store goes
    away, once when it is back). Thread-safe: a worker may log from a thread.
    """

    def __init__(self, where: str, send: Callable[[str, Any], None],
                 probe: Callable[[], str | None] = lambda: None, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 say: Callable[[str], None] = warn, hint: Callable[[], str] = lambda: ""):
        self.where = redact(where)
        self.send, self.probe, self.clock, self.sleep, self.say = send, probe, clock, sleep, say
        self.hint = hint
        """What the user can do when the store stays away (read when it is said)."""
        self.entries: list[tuple[str, Any]] = []
        self.down_since: float | None = None
        self.last_reason = ""
        self.next_try = 0.0
        self.lock = threading.RLock()

    def write(self, kind: str, payload: Any) -> None:
        """Send `payload` after every entry kept before it; keep it if the store is away."""
        with self.lock:
            self.entries.append((kind, payload))
            self.flush()

    def pending(self, kind: str) -> list[Any]:
        with self.lock:
            return [payload for k, payload in self.entries if k == kind]

    def flush(self, force: bool = False) -> bool:
        """Send the kept entries in order; True when none is left. While the store is away,
        only one try in `RETRY_EVERY_S` (or a forced one) reaches for it."""
        with self.lock:
            if not self.entries:
                return True
            if self.down_since is not None:
                if not force and self.clock() < self.next_try:
                    return False
                problem = self.probe()
                if problem:
                    self._away(problem)
                    return False
            sent = 0
            while self.entries:
                kind, payload = self.entries[0]
                try:
                    with interrupts.deferred():
                        self.send(kind, payload)
                except Exception as e:
                    if not transient(e):
                        self.entries.pop(0)  # a write the store refuses: it would block every later one
                        raise
                    self._away(reason(e))
                    return False
                self.entries.pop(0)
                sent += 1
            self._back(sent)
            return True

    def drain(self, doing: str, wait: float | None = None) -> None:
        """Send every kept entry, waiting up to `wait` seconds (default `wait_seconds()`)
        for an absent store; `TrackingUnreachable` if it does not come back."""
        deadline = self.clock() + (wait_seconds() if wait is None else wait)
        with self.lock:
            while not self.flush(force=True):
                if self.clock() >= deadline:
                    raise self.unreachable(doing)
                self.sleep(min(1.0, max(deadline - self.clock(), 0.0)))

    def call(self, fn: Callable[[], Any], doing: str, retry: bool = True, wait: float | None = None) -> Any:
        """`fn()`, a call that must reach the store, after the kept entries; an absent store
        is waited for up to `wait` seconds in all (`retry=False`: `fn` is not idempotent
        and is tried once)."""
        deadline = self.clock() + (wait_seconds() if wait is None else wait)

        def left() -> float:
            return max(deadline - self.clock(), 0.0)

        with self.lock:
            self.drain(doing, left())
            while True:
                problem = self.probe() if self.down_since is not None else None
                if problem is None:
                    try:
                        with interrupts.deferred():
                            result = fn()
                    except Exception as e:
                        if not transient(e):
                            raise
                        problem = reason(e)
                    else:
                        self._back(0)
                        return result
                self._away(problem)
                if not retry or not left():
                    raise self.unreachable(doing) from None
                self.sleep(min(1.0, left()))
                self.drain(doing, left())  # entries another thread kept meanwhile go first

    def unreachable(self, doing: str) -> TrackingUnreachable:
        away = self.clock() - (self.down_since if self.down_since is not None else self.clock())
        hint = f"; {self.hint()}" if self.hint() else ""
        return TrackingUnreachable(f"cannot {doing}: the tracking store {self.where} has been "
                                   f"unreachable for {away:.0f} s ({self.last_reason}){hint}")

    def _away(self, why: str) -> None:
        self.last_reason = why
        self.next_try = self.clock() + RETRY_EVERY_S
        if self.down_since is None:
            self.down_since = self.clock()
            self.say(f"raydeep: warning: the tracking store {self.where} is unreachable ({why}); "
                     "training goes on, and what it misses is kept to be logged when it is back")

    def _back(self, sent: int) -> None:
        if self.down_since is None:
            return
        away, self.down_since = self.clock() - self.down_since, None
        logged = f"; {sent} kept write{'s' if sent != 1 else ''} logged" if sent else ""
        self.say(f"raydeep: the tracking store {self.where} is back after {away:.0f} s{logged}")

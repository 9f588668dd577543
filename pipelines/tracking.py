"""MLflow tracking of a run: params, per-epoch metrics, final metrics, figures, the model.

Only MLflow: checkpoints are `pipelines.storage`'s, the end of an epoch is
`pipelines.context.RunContext`'s, reporting to Tune is the sweep trial's.

A `Tracker` holds only strings, so it can travel to the rank-0 worker of a Ray job and log
from there; it talks to the store through `MlflowClient`, never through global state.
Its writes outlive an outage of the store (`pipelines.backlog`): each process keeps what
it could not write and writes it, in order, once the store is back.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.backlog import Backlog, bound_http_waits, port_probe, reason, transient, wait_seconds
from pipelines.errors import TrackingUnreachable, redact

EPOCH_KEYS = ("train_loss", "samples_per_s")

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Tags of every experiment raydeep creates: MLflow 3's UI opens an experiment of this kind
on its runs table (model training), not on the GenAI overview of traces."""


def absolute_uri(uri: str) -> str:
    """A relative SQLite path made absolute, so that workers in other directories agree."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    if "://" not in uri:
        raise ValueError(f"tracking.uri {uri!r} is not a URI (e.g. sqlite:///mlflow.db, http://host:5000)")
    return uri


STORE_DRIVERS = {"postgresql": ("psycopg2", "psycopg2-binary"), "mysql": ("pymysql", "pymysql"),
                 "mssql": ("pyodbc", "pyodbc")}
"""A database scheme -> (module MLflow's SQLAlchemy store needs, the package that has it)."""


def check_store(uri: str, timeout: float = 3.0) -> None:
    """A one-line `ConfigError` for a tracking URI that cannot work, found in seconds before
    Ray starts (an MLflow client retries an address nobody answers at for minutes)."""
    import importlib.util
    import socket
    from urllib.parse import urlsplit

    from pipelines.config import ConfigError

    wait_seconds()  # RAYDEEP_TRACKING_WAIT_S is checked with the store it waits for
    shown = redact(uri)
    scheme = uri.partition("://")[0].lower()
    dialect, _, driver = scheme.partition("+")
    if scheme == "file":
        raise ConfigError(f"tracking.uri {shown!r}: MLflow 3 refuses file stores; use a SQLite file "
                          "(sqlite:///mlflow.db) or a server (http://HOST:5000)")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):  # sqlite://x.db: SQLAlchemy reads 'x.db' as a host
            raise ConfigError(f"tracking.uri {shown!r}: a SQLite URI has three slashes "
                              "(sqlite:///mlflow.db, or four for an absolute path)")
        path = Path(absolute_uri(uri)[len("sqlite:///"):])
        if path.is_dir():
            raise ConfigError(f"tracking.uri {shown!r}: {str(path)!r} is a directory; name a file in it "
                              "(sqlite:///DIR/mlflow.db)")
        if not path.parent.is_dir():
            raise ConfigError(f"tracking.uri {shown!r}: the directory {str(path.parent)!r} does not exist")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise ConfigError(f"tracking.uri {shown!r}: {str(path)!r} cannot be written")
        return
    if scheme in ("http", "https"):
        parts = urlsplit(uri)
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
        except OSError as e:
            raise ConfigError(f"no MLflow server answers at {shown} ({e.strerror or e}); start one with "
                              "`mlflow server` or `raydeep ui`, or keep the default sqlite:///mlflow.db") from None
        return
    if dialect in STORE_DRIVERS:
        module, package = STORE_DRIVERS[dialect]
        if not driver and importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking.uri {shown!r} needs the {package} package "
                              f"(pip install {package})")
        return
    if scheme not in ("databricks", "databricks-uc"):
        raise ConfigError(f"tracking.uri {shown!r}: {scheme!r} is not a store MLflow opens "
                          "(sqlite, http, https, postgresql, mysql, mssql, databricks)")


def open_store_in_background(uri: str):
    """Import MLflow and open (for a new SQLite file: create) the store in a thread, while
    the caller starts Ray: together they take seconds. Returns the thread to join; errors
    are left for the run's own first call to report."""
    import threading

    bound_http_waits(uri)  # the caller joins this thread: no MLflow call may wait minutes

    def open_store():
        try:
            _client(absolute_uri(uri)).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - the run reports the store's problem itself
            pass

    thread = threading.Thread(target=open_store, name="raydeep-open-store", daemon=True)
    thread.start()
    return thread


def recorded_run(uri: str, run_id: str):
    """The MLflow run `run_id` in store `uri`, which a resumed run continues; a run that is
    not there (another store, a deleted run) is refused in one line."""
    from mlflow.exceptions import MlflowException

    from pipelines.config import ConfigError

    bound_http_waits(uri)
    try:
        return _client(uri).get_run(run_id)
    except MlflowException as e:
        if transient(e):
            raise _unreachable(uri, "reopen the run", e) from None
        raise ConfigError(f"--resume: the run's MLflow run {run_id} is not in the tracking store "
                          f"{redact(uri)} (pass the --tracking-uri it was recorded in)") from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        from pipelines import sqlite_store

        sqlite_store.seed(uri[len("sqlite:///"):])  # a new store: a copy, not 1 s of migrations
    return MlflowClient(tracking_uri=uri)


@dataclass
class Tracker:
    uri: str
    run_id: str
    experiment_id: str
    epochs: int = 0
    echo: bool = True
    """Print a progress line per epoch."""
    launched_at: float = 0.0
    """When the run was launched (time.time(), `pipelines.startup`): the origin of its
    start-up timeline. 0: unknown (a tracker made outside `pipelines.train`), no timeline."""
    run_name: str = ""
    """The name `raydeep run --resume` takes for this run (set by `pipelines.run.open_run`):
    an absent store's error names it. Empty for a sweep's trials (Tune resumes them)."""
    _backlog: Backlog | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # A copy sent to a Ray worker keeps the writes it makes there, not this process's.
        return {**self.__dict__, "_backlog": None}

    @property
    def backlog(self) -> Backlog:
        """This process's writes that the store has not taken yet."""
        if self._backlog is None:
            bound_http_waits(self.uri)
            self._backlog = Backlog(self.uri, self._send, port_probe(self.uri), hint=self._resume_hint)
        return self._backlog

    def _resume_hint(self) -> str:
        if not self.run_name:
            return "its checkpoints are kept for a resume once the store is back"
        return (f"its checkpoints are kept, and `raydeep run --resume {self.run_name} "
                f"--tracking-uri {redact(self.uri)}` logs what MLflow missed once the store is back")

    def _send(self, kind: str, payload: list) -> None:
        _client(self.uri).log_batch(self.run_id, **{kind: payload})

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, params: dict[str, Any],
              tags: dict[str, str] | None = None, epochs: int = 0) -> "Tracker":
        bound_http_waits(uri)
        client = _client(uri)
        try:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, tags=EXPERIMENT_TAGS)
            if found and not EXPERIMENT_TAGS.keys() <= found.tags.keys():  # made by an older raydeep
                for key, value in EXPERIMENT_TAGS.items():
                    client.set_experiment_tag(experiment_id, key, value)
            run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        except Exception as e:
            raise _unreachable(uri, "start the run", e) if transient(e) else e
        tracker = cls(uri, run.info.run_id, experiment_id, epochs)
        tracker.log_params(params)
        return tracker

    @classmethod
    def reopen(cls, uri: str, run_id: str, epochs: int = 0) -> "Tracker":
        """Continue an earlier run (a resumed training): same run id, status RUNNING again.

        Each attempt is counted (`raydeep.attempts`); one that was still RUNNING had its
        driver killed without a word (SIGKILL, a lost node), and its tag says so."""
        client = _client(uri)
        run = recorded_run(uri, run_id)
        attempts = int(run.data.tags.get("raydeep.attempts", "1"))
        tags = {"raydeep.attempts": str(attempts + 1)}
        if run.info.status == "RUNNING":
            tags[f"raydeep.attempt_{attempts}"] = "lost: its driver ended without ending the run"
        try:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.update_run(run_id, status="RUNNING")
        except Exception as e:
            raise _unreachable(uri, "reopen the run", e) if transient(e) else e
        return cls(uri, run_id, run.info.experiment_id, epochs)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, "None" if v is None else redact(str(v))) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.backlog.write("params", items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, timestamp: int | None = None) -> None:
        """`timestamp` (ms): the time the values are recorded at (default: now)."""
        now = now_ms() if timestamp is None else timestamp
        self.log_rows([(k, v, now, step) for k, v in metrics.items()])

    def log_series(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Metrics of many steps in few writes: [(step, {key: value}), ...]."""
        now = now_ms()
        self.log_rows([(k, v, now, step) for step, metrics in rows for k, v in metrics.items()])

    def log_rows(self, rows: list[tuple[str, float, int, int]]) -> None:
        """Metrics as (key, value, timestamp ms, step). Logging the same row again adds
        nothing: SQL stores (and a server over one) keep one row per (key, value,
        timestamp, step), which makes writing a checkpoint's metrics again harmless."""
        from mlflow.entities import Metric

        items = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in rows]
        for start in range(0, len(items), 1000):
            self.backlog.write("metrics", items[start:start + 1000])

    def wait_for_store(self, doing: str) -> None:
        """Write everything kept so far, waiting a bounded time (`RAYDEEP_TRACKING_WAIT_S`)
        for an absent store; `TrackingUnreachable` (saying what could not be done) if it
        stays away."""
        self.backlog.drain(doing)

    def unlogged(self) -> list[list]:
        """The metrics this process has not written to the store yet, as log_rows takes them."""
        return [[m.key, m.value, m.timestamp, m.step] for batch in self.backlog.pending("metrics")
                for m in batch]

    def since_launch(self, at: float | None = None) -> float:
        """Seconds from the launch to wall-clock time `at` (default: now)."""
        return (time.time() if at is None else at) - self.launched_at

    def startup(self, name: str, at: float | None = None) -> None:
        """Log the start-up mark `startup_<name>_s`: seconds from the launch to `at` (default: now)."""
        self.log_startup({name: self.since_launch(at)})

    def first_step(self, at: float | None = None) -> float | None:
        """Log `time_to_first_step_s` (and the mark `startup_first_step_s`) for a first
        optimizer step that ended at `at` (default: now); returns it (None: no launch known)."""
        if not self.launched_at:
            return None
        seconds = self.since_launch(at)
        self.log_startup({"first_step": seconds})
        return seconds

    def log_startup(self, marks: dict[str, float]) -> None:
        """Start-up marks already measured, {name: seconds since launch}, in one write; a
        `first_step` mark is also the run's `time_to_first_step_s`."""
        if not self.launched_at:
            return
        metrics = {f"startup_{name}_s": seconds for name, seconds in marks.items()}
        if "first_step" in marks:
            metrics["time_to_first_step_s"] = marks["first_step"]
        self.log_metrics(metrics)

    def log_epoch(self, epoch: int, metrics: dict[str, float], timestamp: int | None = None) -> None:
        """Per-epoch metrics at step `epoch` (0-based) and a progress line."""
        self.log_metrics(metrics, step=epoch, timestamp=timestamp)
        keys = ["train_loss", *sorted(k for k in metrics if k.startswith("val_")), "samples_per_s"]
        shown = "  ".join(
            f"{k} {metrics[k]:.4f}" if k != "samples_per_s" else f"samples/s {metrics[k]:,.0f}"
            for k in keys if k in metrics)
        total = f"/{self.epochs}" if self.epochs else ""
        self.say(f"epoch {epoch + 1}{total}  {shown}")

    def say(self, line: str) -> None:
        """A progress line on the terminal (when `echo`)."""
        if self.echo:
            # The process's own stdout: Ray Train's print patch would log the line twice.
            print(line, flush=True, file=sys.__stdout__)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.backlog.write("tags", [RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path) -> None:
        self.backlog.call(lambda: _client(self.uri).log_artifact(self.run_id, str(path)),
                          f"log {Path(path).name}")

    def log_figure(self, figure, name: str) -> None:
        self.backlog.call(lambda: _client(self.uri).log_figure(self.run_id, figure, name), f"log {name}")

    def log_model(self, model, input_example, code_paths: list[str] = (), signature=None) -> None:
        """Log `model` as the run's MLflow model (`pipelines.serving.log_model` says how)."""
        from pipelines import serving

        # Tried once: a retried log_model would record a second model.
        self.backlog.call(lambda: serving.log_model(self.uri, self.run_id, model, input_example, code_paths,
                                                    signature, self.say), "log the model", retry=False)

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run after every kept write; `TrackingUnreachable` if the store stays away."""
        def end():
            client = _client(self.uri)
            if error:
                client.set_tag(self.run_id, "error", error[:5000])
            client.set_terminated(self.run_id, status=status)

        after = f" after {error.strip().splitlines()[0][:300]}" if error and error.strip() else ""
        self.backlog.call(end, f"mark the run {status}{after}")

    def _read(self, fn):
        return self.backlog.call(fn, "read the run's metrics")

    def status(self) -> str:
        return self._read(lambda: _client(self.uri).get_run(self.run_id).info.status)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which `key` has been logged."""
        return {m.step for m in self._read(lambda: _client(self.uri).get_metric_history(self.run_id, key))}

    def metric_history(self, key: str) -> list[float]:
        """Every value logged under `key`, oldest first."""
        history = self._read(lambda: _client(self.uri).get_metric_history(self.run_id, key))
        return [m.value for m in sorted(history, key=lambda m: (m.timestamp, m.step))]

    def epoch_history(self) -> list[dict[str, float]]:
        """Per-epoch metrics as logged (for a restarted epoch, the last value logged wins)."""
        return self._read(self._epoch_history)

    def _epoch_history(self) -> list[dict[str, float]]:
        client = _client(self.uri)
        keys = [k for k in client.get_run(self.run_id).data.metrics
                if k in EPOCH_KEYS or k.startswith(("val_", "grad_norm."))]
        by_step: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in sorted(client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp):
                by_step.setdefault(m.step, {})[key] = m.value
        return [by_step[s] for s in sorted(by_step)]


def now_ms() -> int:
    return int(time.time() * 1000)


def _unreachable(uri: str, doing: str, error: BaseException) -> TrackingUnreachable:
    return TrackingUnreachable(f"cannot {doing}: the tracking store {redact(uri)} is unreachable "
                               f"({reason(error)})")

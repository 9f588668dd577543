"""Connecting to Ray: an embedded local instance by default, or an existing cluster."""
from __future__ import annotations

import logging
import os
import re

LOCAL_SYSTEM_CONFIG = {
    # Objects up to 1 MiB go inline in actor calls instead of through the shared-memory
    # object store: a parameter server's 340 KB push/pull then takes 1.8 ms instead of
    # 3.0 ms on 2 cores (measured). On a cluster, set it when starting Ray:
    # `ray start ... --system-config='{"max_direct_call_object_size": 1048576}'`.
    "max_direct_call_object_size": 1 << 20,
    # Ray runs its workers at nice 15 so that its daemons keep a busy cluster node
    # responsive. On one machine the workers are the job: at nice 15 every other process
    # (the driver, the MLflow store, Ray's daemons) preempts the training they wait for.
    "worker_niceness": 0,
    # Nothing scrapes Ray's metrics on an embedded instance; exporting them is work for nothing.
    "enable_metrics_collection": False,
}
"""Ray settings of the embedded local Ray."""

STREAMING_SYSTEM_CONFIG = {
    # Ray kills a task worker idle for 1 s once there are more workers than CPUs, which a
    # run's actors alone make: between two streamed epochs (validation, checkpoint) Ray
    # Data's read workers died and the next epoch started them afresh. Kept for a minute,
    # the 2nd and 3rd epochs of 1,500 steps on 0.5 GB ran at 18,518 samples/s [17,897-20,389]
    # (5 runs) instead of 11,078 [9,676-12,825] (2 runs; benchmarks/ingest.py's table). On a
    # cluster: `ray start ... --system-config='{"idle_worker_killing_time_threshold_ms": 60000}'`.
    # Only for a streamed run: in a sweep, killed and resumed, workers kept alive raced the
    # resumed trials for their checkpoints (tests/system/test_sweep.py failed 3 runs of 5).
    "idle_worker_killing_time_threshold_ms": 60_000,
}
"""What an embedded Ray adds for a run that streams its table through Ray Data."""

LOCAL_RAY_ENV = {
    # Nothing preempts the nodes of an embedded Ray: the watcher is one more actor process
    # to start before the first step, and it logs a Ray-internal error line when it starts.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's controller polls its workers every 2 s by default, and a poll takes one
    # report off each worker's queue of one: a worker's `ray.train.report` (raydeep's
    # checkpoint, every epoch) waits for the poll after the one that took the last. At 0.5 s
    # the main job's 50 digits epochs took 0.51 s each, 0.07 of it training, and the run
    # 45.2 s; at 0.1 s, 0.106 s and 26.0 s (2026-12-08). A poll is one small call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # Ray Train's metrics go to Ray's metrics export, which the embedded Ray turns off.
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # Ray Data lists a Parquet table's files by reading their footers in a pool of actors
    # (32 by default), started anew by every execution, every epoch of every reader: on 2
    # cores each is a process importing Ray Data and pyarrow, and a 4-file table's listing
    # started about 4 of them before it was done and killed them. One actor (128 footer
    # reads in flight) lists a table on one machine: `test_an_epochs_batches...` of
    # tests/strategies/test_streaming.py started 29 worker processes and took 19.4 s; 9 and
    # 15.3 s with one (measured 2026-12-07). A cluster keeps Ray's default.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}
"""Ray Train and Ray Data settings of the embedded local Ray, set in the environment before
it starts (its raylet, hence every worker, inherits them; the driver passes Ray Train's to
its controller and workers); a value the user set in the environment wins."""

VERBOSE_ENV = "RAYDEEP_VERBOSE"
"""Set (to 1) by `--verbose`: Ray's own log lines reach the terminal as Ray prints them."""

_RAY_INTERNAL_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] \S+\.(cc|h):\d+:")
"""A line of Ray's C++ core (`[2026-11-29 20:16:25,403 E 21810 21838] core_worker.cc:2465: ...`):
internal state a user cannot act on. It is in Ray's log files under /tmp/ray/session_*/logs."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_ray_logs() -> None:
    """Keep the terminal to raydeep's own progress lines and real warnings; Ray's and
    MLflow's informational lines stay in their log files (`--verbose` shows them)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if verbose():
        return
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data sets its loggers' level in every process that imports it (a streamed table's
    # split coordinator logs each epoch's execution plan): the level it takes from here on.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    # "Token authentication is enabled for this Ray cluster": what an embedded Ray always
    # does, not something to act on; "Creating initial MLflow database tables": routine.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # A store that fails a write ("database is locked") is logged by MLflow with a whole
    # traceback before raydeep's backlog keeps the rows and says so in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def filter_worker_logs() -> None:
    """Drop Ray's C++ lines from what the workers' output forwards to this terminal.

    Ray forwards each worker's stdout/stderr to the driver through one dispatcher; its
    handler is replaced by one that passes everything but those lines. Ray's internals
    may change: where the dispatcher is not found, the output stays as Ray prints it.
    """
    if verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    for name, handler in handlers:
        if name == "ray_print_logs" and not getattr(handler, "raydeep_filter", False):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _without_internal_lines(handler))


_DYING_HANDLE = "Exception ignored in: <function ActorHandle.__del__"
"""How the traceback starts that an actor raydeep killed may print while Python collects a
handle it held: Ray's SIGTERM handler raises SystemExit inside `ActorHandle.__del__`."""


def _without_shutdown_noise(lines: list[str]) -> list[str]:
    """`lines` without the tracebacks of killed actors' handle collection (to `SystemExit`)."""
    kept, dropping = [], False
    for line in lines:
        if line.startswith(_DYING_HANDLE):
            dropping = True
        elif dropping and line.startswith("SystemExit"):
            dropping = False
            continue
        if not dropping:
            kept.append(line)
    return kept


def _without_internal_lines(handler):
    def forward(data: dict) -> None:
        lines = [line for line in _without_shutdown_noise(data.get("lines", []))
                 if not _RAY_INTERNAL_LINE.match(line)]
        if lines:
            handler({**data, "lines": lines})

    forward.raydeep_filter = True
    return forward


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True,
            runtime_env: dict | None = None, streaming: bool = False) -> dict:
    """Start or join Ray once per process; returns the cluster's resources.

    An embedded Ray runs its dashboard where `dashboard` says: besides the web page it
    serves Ray's state API, which Ray Train's placement-group cleaner polls (without it, the
    cleaner warns on the terminal and cannot clean up); a run of raydeep's own actors does
    without it. A cluster keeps whatever it was started with. `runtime_env` is the job's
    (a user's model code, `pipelines.user_code`): Tune's trials and Ray Train's controller get it.
    `streaming`: the run streams its table (`STREAMING_SYSTEM_CONFIG` for an embedded Ray).
    """
    import ray

    from cluster import ray_address

    quiet_ray_logs()
    # A Ray job's driver (`raydeep submit`) finds its cluster in RAY_ADDRESS; starting an
    # embedded Ray there would fail on `_system_config`, which only a new cluster takes.
    # An address given here wins over RAY_ADDRESS; ray.init would retry a bad one for
    # half a minute, so it is checked first (the CLI has checked it before anything else).
    address, origin = ray_address.chosen(address, "resources.address")
    if address is not None and not ray.is_initialized():
        ray_address.check_one(address, origin)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        runtime_env = None  # a submitted job's driver: the job's runtime_env has the code already
    if not ray.is_initialized():
        level = logging.INFO if verbose() else logging.WARNING
        if address:
            ray.init(address=address, logging_level=level, runtime_env=runtime_env or None)
        else:
            for key, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(key, value)
            # address="local": a Ray of our own whatever else runs or ran here (a cluster
            # started with `ray start` and killed leaves a file that plain ray.init would join).
            ray.init(address="local", num_cpus=num_cpus, logging_level=level,
                     include_dashboard=dashboard,
                     _system_config={**LOCAL_SYSTEM_CONFIG, **(STREAMING_SYSTEM_CONFIG if streaming else {})},
                     runtime_env=runtime_env or None)
    filter_worker_logs()
    return ray.cluster_resources()

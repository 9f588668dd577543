"""An MLflow server stopped mid-run (a real `mlflow server` process, SIGKILLed): training goes
on, what the store missed is logged once it is back, or the run ends in one line with its
checkpoints kept and `--resume` logs the rest."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, free_port, run_cli

from cluster.ui import server_command
from pipelines.backlog import HTTP_DEFAULTS, WAIT_ENV
from pipelines.storage import checkpoint_name, complete_checkpoints
from pipelines.tracking import EPOCH_KEYS

pytestmark = pytest.mark.slow  # `mlflow server` processes started, killed and started again

EPOCHS = 20


class Server:
    """`mlflow server` over a SQLite file in `workdir`, on a port of its own."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{workdir / 'server.db'}"
        self.log = workdir / "server.log"
        self.process = None

    def start(self) -> None:
        # No job runner: it is six more processes to start, and runs are all this test logs.
        self.process = subprocess.Popen(
            server_command(self.backend, "127.0.0.1", self.port), stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.time() + 60
        while time.time() < deadline and self.process.poll() is None:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"mlflow server did not answer on port {self.port}: "
                             f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Killed, not shut down: the store vanishes mid-request, as when its machine dies."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def train_loss_steps(self, run_id: str) -> list[int]:
        url = f"{self.uri}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=train_loss"
        with urllib.request.urlopen(url, timeout=5) as response:
            return [m["step"] for m in json.loads(response.read()).get("metrics", [])]


@pytest.fixture(scope="module")
def started_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


@pytest.fixture
def server(started_server, workdir):
    """The module's server (one start less per test), running; the MLflow settings a run
    sets in this process are undone after the test."""
    if started_server.process.poll() is not None:
        started_server.start()
    saved = {key: os.environ.get(key) for key in HTTP_DEFAULTS}
    yield started_server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Run:
    """`raydeep run` (the CLI's own entry point, `run_cli`) in a thread, while the test
    stops and starts the server."""

    def __init__(self, workdir: Path, server: Server, name: str):
        self.name, self.location = name, workdir / "raydeep_runs" / name
        args = ["run", "--strategy", "local", "--epochs", str(EPOCHS), "--tracking-uri", server.uri,
                "--run-name", name, "--set", "tracking.log_model=false"]
        self.done: list = []
        self.thread = threading.Thread(target=lambda: self.done.append(run_cli(*args, cwd=workdir)))
        self.thread.start()

    def running(self) -> bool:
        return self.thread.is_alive()

    def result(self):
        self.thread.join(timeout=120)
        assert self.done, "the run did not end"
        return self.done[0]


def stop_after_first_epoch(server: Server, run: Run) -> tuple[str, int]:
    """Once the server holds an epoch of the run, stop it; the run's MLflow id and the
    last epoch the server got."""
    marker = run.location / "raydeep_run.json"
    deadline = time.time() + 120
    while time.time() < deadline and run.running():
        try:
            run_id = json.loads(marker.read_text())["mlflow_run_id"]
        except (OSError, ValueError):  # not written yet, or half written
            run_id = None
        steps = server.train_loss_steps(run_id) if run_id else []
        if steps:
            server.stop()
            return run_id, max(steps)
        time.sleep(0.05)
    raise AssertionError(f"the run never logged an epoch: {run.result()}")


def wait_for_checkpoint(run: Run, epoch: int) -> None:
    """Until the run has checkpointed epoch `epoch` or a later one (older ones are pruned)."""
    deadline = time.time() + 120
    while run.running() and time.time() < deadline:
        if any(saved >= epoch for saved, _ in complete_checkpoints(str(run.location))):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} or later while the store was away")


def assert_every_epoch_once(server: Server, run_id: str) -> None:
    """Each epoch metric holds every epoch once, logged in the order of the epochs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in (*EPOCH_KEYS, "val_loss"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
        assert [m.step for m in history] == list(range(EPOCHS)), key


def test_a_store_back_before_the_end_gets_every_epoch_and_the_run_finishes(workdir, server):
    run = Run(workdir, server, "back")
    run_id, logged = stop_after_first_epoch(server, run)
    stopped = time.time()
    wait_for_checkpoint(run, logged + 3)  # training goes on without the store
    server.start()
    result = run.result()
    assert result.returncode == 0, result.stderr
    went = [line for line in result.stderr.splitlines() if "is unreachable" in line]
    back = [line for line in result.stderr.splitlines() if "is back after" in line]
    assert len(went) == 1 and went[0].startswith(f"raydeep: warning: the tracking store {server.uri} "
                                                 "is unreachable (Connection refused)"), result.stderr
    assert len(back) == 1 and "kept writes logged" in back[0], result.stderr
    assert f"epoch {EPOCHS}/{EPOCHS}" in result.stdout
    assert time.time() - stopped < 90
    assert_every_epoch_once(server, run_id)


def test_a_store_that_stays_away_ends_the_run_in_one_line_and_resume_logs_the_rest(
        workdir, server, monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "2")
    run = Run(workdir, server, "away")
    run_id, _ = stop_after_first_epoch(server, run)
    stopped = time.time()
    result = run.result()
    # Bounded: MLflow's first failing call (3 tries, seconds), the remaining epochs, 2 s of waiting.
    assert time.time() - stopped < 45
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raydeep: error: cannot end the run: the tracking store {server.uri} "
                           "has been unreachable for "), result.stderr
    assert last.endswith(f"its checkpoints are kept, and `raydeep run --resume away --tracking-uri "
                         f"{server.uri}` logs what MLflow missed once the store is back"), last
    assert f"epoch {EPOCHS}/{EPOCHS}" in result.stdout  # every epoch trained and checkpointed
    assert (run.location / checkpoint_name(EPOCHS - 1) / "complete.json").exists()

    server.start()
    assert len(server.train_loss_steps(run_id)) < EPOCHS  # what the store missed
    monkeypatch.delenv(WAIT_ENV)
    resumed = run_cli("run", "--resume", "away", "--tracking-uri", server.uri, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_every_epoch_once(server, run_id)


class ProcessRun:
    """`raydeep run` in a process of its own, which a signal can interrupt (Ctrl-C)."""

    def __init__(self, workdir: Path, server: Server, name: str, epochs: int, env: dict):
        self.location = workdir / "raydeep_runs" / name
        # As a terminal's foreground job, whatever this suite was started as: a job started
        # in the background of a script (`bash .ci/run &`) ignores SIGINT, and an ignored
        # signal stays ignored across exec, so the run would never see the Ctrl-C (it
        # trained all its epochs, once). A signal with a handler is reset to the default.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cluster.cli", "run", "--strategy", "local", "--epochs", str(epochs),
                 "--tracking-uri", server.uri, "--run-name", name, "--set", "tracking.log_model=false"],
                cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO), **env})
        finally:
            signal.signal(signal.SIGINT, previous)

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self):
        out, err = self.process.communicate(timeout=120)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, out, err)


def test_ctrl_c_while_the_store_is_away_exits_130_and_says_the_run_is_unmarked(workdir, server):
    """The interrupt is still an interrupt (exit 130), and the line says why the MLflow run
    is not KILLED and how `--resume` ends it; the checkpoints stay."""
    run = ProcessRun(workdir, server, "interrupted", epochs=500, env={WAIT_ENV: "2"})
    run_id, _ = stop_after_first_epoch(server, run)
    wait_for_checkpoint(run, 1)
    run.process.send_signal(signal.SIGINT)
    result = run.result()
    assert result.returncode == 130, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raydeep: interrupted; cannot mark the run KILLED after interrupted by the user: "
                           f"the tracking store {server.uri} has been unreachable for "), last
    assert "`raydeep run --resume interrupted" in last and "Traceback" not in result.stderr
    assert complete_checkpoints(str(run.location))
    server.start()
    from mlflow.tracking import MlflowClient

    assert MlflowClient(server.uri).get_run(run_id).info.status == "RUNNING"  # until --resume ends it

"""A real two-node Ray cluster (`ray start --head` + `ray start --address`) on free local
ports, driven through `raydeep submit` / `raydeep jobs` as a user would from a laptop.

The nodes run in their own process groups under their own temp dir and are stopped by
killing those groups: a bare `ray stop` would also stop every other Ray on this machine.
Token auth is on, with a token of the test's own (never ~/.ray/auth_token). The `ps` test
checks SPREAD placement by node id on this real pair (a `ray.cluster_utils.Cluster` in a
further process cost ~100 s more on 2 cores).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port, run_cli_process
from mlflow.tracking import MlflowClient

RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["--set", "model.width=32", "--set", "model.depth=1", "--set", "optim.steps_per_epoch=5",
        "--set", "tracking.log_model=false", "--epochs", "1"]
USER_NET = """
import math

from torch import nn


class Net(nn.Sequential):
    def __init__(self, input_shape, num_classes, width: int = 64):
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_classes))
"""
TINY_USER = ["--model", "clusternet:Net", "--set", "model.init_args.width=32", *TINY[4:]]
"""The same tiny run of a user's module (USER_NET, written to a directory of its own)."""


def user_project(tmp_path: Path) -> Path:
    """A user's directory outside the repository holding their module."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "clusternet.py").write_text(USER_NET)
    return project




def node_ports() -> list[str]:
    """Every port a node opens, free: two nodes on one machine must not share any."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    # worker ports 0: each worker process binds a port the OS picks (the default range is
    # one both nodes would draw from)
    return [f"--{name}={free_port()}" for name in names] + ["--min-worker-port=0",
                                                            "--max-worker-port=0"]


class TwoNodes:
    """A head (2 CPUs, Jobs server) and a worker node (2 CPUs), started and stopped by us."""

    def __init__(self):
        self.token = secrets.token_hex(32)
        self.temp = tempfile.mkdtemp(prefix="rdk", dir="/tmp")  # short: Ray's socket paths
        self.gcs, self.dashboard = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.dashboard}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # the job's `raydeep` is this virtualenv's
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen] = []
        self.temps = [self.temp]

    def start(self) -> None:
        def common() -> list[str]:  # fresh ports per node, picked just before it starts
            return ["--block", "--num-cpus=2", "--object-store-memory=100000000",
                    "--node-ip-address=127.0.0.1", "--disable-usage-stats", *node_ports()]

        self._spawn("head", [RAY, "start", "--head", f"--port={self.gcs}",
                             f"--dashboard-port={self.dashboard}", "--dashboard-host=127.0.0.1",
                             f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp}",
                             *common()])
        self._until(lambda: self._answers(), "the head's Jobs server")
        # Its own temp dir too: on one machine two nodes would otherwise unpack the job's
        # working_dir into the same folder, each deleting it under the other's processes.
        # Ray waits a fixed 30 s for a new node's raylet to register with the GCS and then
        # exits; on a 2-core machine busy with the other pytest process that happened once in
        # a fresh-clone run (2026-12-07): such a node is started once more.
        for attempt in range(2):
            node_temp = tempfile.mkdtemp(prefix="rdk", dir="/tmp")
            self.temps.append(node_temp)
            self._spawn("node", [RAY, "start", f"--address=127.0.0.1:{self.gcs}",
                                 f"--temp-dir={node_temp}", *common()])
            if self._until(lambda: self.alive_nodes() == 2, "the second node", last=attempt == 1):
                return
            node = self.processes.pop()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(Path(self.temp) / f"{name}.out", "w")
        # Its own session: the group holds gcs, raylet, dashboard... and is killed as one.
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def _answers(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.url}/api/version", timeout=1).status_code in (200, 401)
        except requests.RequestException:
            return False

    def alive_nodes(self) -> int:
        import requests

        r = requests.get(f"{self.url}/nodes?view=summary", timeout=5,
                         headers={"Authorization": f"Bearer {self.token}"})
        return sum(1 for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE")

    def _until(self, ok, what: str, timeout: float = 90, last: bool = True) -> bool:
        """True once `ok()`; False if a process ended or time ran out and this is not the
        `last` try; else the cluster is stopped and the test fails with the nodes' logs."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.processes):
                break
            try:
                if ok():
                    return True
            except Exception:
                pass
            time.sleep(0.5)
        if not last:
            return False
        logs = "".join(p.read_text()[-1500:] for p in Path(self.temp).glob("*.out"))
        self.stop()
        pytest.fail(f"{what} did not come up:\n{logs}")

    def stop(self) -> None:
        # A test cluster keeps nothing worth a graceful stop: `ray start --block` takes 8 s to
        # end on SIGTERM (the suite waited for it), SIGKILL of its process group is at once.
        for p in reversed(self.processes):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.processes:
            p.wait(timeout=10)
        self.processes = []
        for temp in self.temps:  # logs, sockets, the jobs' unpacked working_dirs
            shutil.rmtree(temp, ignore_errors=True)

    def submit(self, *command: str, token: str | None = "", home: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
        env = {"RAY_AUTH_TOKEN": self.token if token == "" else (token or "")}
        if home is not None:
            env["HOME"] = str(home)
        return run_cli_process("submit", "--address", self.url, *command, cwd=REPO, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cluster():
    nodes = TwoNodes()
    nodes.start()
    yield nodes
    nodes.stop()


def job_client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.url, headers={"Authorization": f"Bearer {cluster.token}"})


def submitted_id(stderr: str) -> str:
    line = next(l for l in stderr.splitlines() if l.startswith("raydeep: submitted job "))
    return line.split()[3]


def run_args(strategy: str, tmp_path: Path, *extra: str, tiny: list[str] = TINY) -> list[str]:
    """`-- raydeep run ...` of a tiny 2-worker run tracked in tmp_path's own store."""
    return ["--", "raydeep", "run", "--strategy", strategy, "--workers", "2", *tiny, *extra,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage-path", str(tmp_path / "runs"),
            # one machine: every node sees tmp_path
            "--set", "resources.shared_storage=true", "--run-name", f"cluster-{strategy}"]


def check_job(cluster, tmp_path: Path, strategy: str, code: int, stdout: str, stderr: str) -> str:
    """The job succeeded, its logs end with the final metrics, MLflow holds the run."""
    assert code == 0, stderr[-3000:] + stdout[-3000:]
    assert "test_accuracy" in stdout  # the followed logs end with the final metrics
    job_id = submitted_id(stderr)
    jobs = job_client(cluster)
    assert jobs.get_job_status(job_id).value == "SUCCEEDED"
    logs = jobs.get_job_logs(job_id)
    assert f"cluster-{strategy}) finished" in logs and "test_accuracy" in logs
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = store.search_runs([store.get_experiment_by_name("raydeep").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [(f"cluster-{strategy}", "FINISHED")]
    assert "test_accuracy" in runs[0].data.metrics
    return logs


@pytest.mark.slow
def test_submitted_allreduce_run_of_a_users_module_succeeds_across_two_nodes(cluster, tmp_path):
    """The user's module goes with the job (--code-dir: its py_modules), from a directory
    outside the repository that the job's driver, on the head node, never sees."""
    project = user_project(tmp_path)
    result = cluster.submit("--code-dir", str(project), *run_args("allreduce", tmp_path, tiny=TINY_USER))
    logs = check_job(cluster, tmp_path, "allreduce", result.returncode, result.stdout, result.stderr)
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = store.search_runs([store.get_experiment_by_name("raydeep").experiment_id])
    assert run.data.tags["raydeep.model_class_path"] == "clusternet:Net"
    job_id = submitted_id(result.stderr)
    # SPREAD puts the two ranks on the two nodes, and rank 0's log line names their node ids
    # (`ps` spreads its workers in the --address test below and in test_multinode.py).
    placement = next((l for l in logs.splitlines() if "placement (SPREAD) over 2 node(s)" in l), None)
    assert placement, logs[-3000:]
    nodes = re.findall(r"rank-\d on \S+ \(node (\w+)\)", placement)
    assert len(nodes) == 2 and nodes[0] != nodes[1], placement

    listed = run_cli_process("jobs", "list", "--address", cluster.url, cwd=REPO,
                     env={"RAY_AUTH_TOKEN": cluster.token})
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    shown = run_cli_process("jobs", "logs", job_id, "--address", cluster.url, cwd=REPO,
                    env={"RAY_AUTH_TOKEN": cluster.token})
    assert shown.returncode == 0 and "test_accuracy" in shown.stdout


@pytest.mark.slow
def test_a_failing_job_exits_non_zero(cluster, tmp_path):
    """Local storage on two nodes: the run refuses to start, in one line, and the job fails."""
    result = cluster.submit("--", "raydeep", "run", "--strategy", "ps", *TINY,
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAILED" in result.stderr.splitlines()[-1]
    assert "the cluster has 2 nodes but resources.storage_path 'raydeep_runs' and tracking.uri" in result.stdout


@pytest.mark.slow
def test_no_wait_then_stop(cluster):
    result = cluster.submit("--no-wait", "--submission-id", "raydeep-test-stop", "--",
                            "raydeep", "run", "--strategy", "ps", "--epochs", "50",
                            "--set", "resources.shared_storage=true")
    assert result.returncode == 0 and result.stdout.strip() == "raydeep-test-stop", result.stderr
    stopped = run_cli_process("jobs", "stop", "raydeep-test-stop", "--address", cluster.url, cwd=REPO,
                      env={"RAY_AUTH_TOKEN": cluster.token})
    assert stopped.returncode == 0, stopped.stderr
    jobs = job_client(cluster)
    deadline = time.time() + 60
    while not jobs.get_job_status("raydeep-test-stop").is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.get_job_status("raydeep-test-stop").value == "STOPPED"


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydeep: error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_wrong_or_missing_token_is_one_line(cluster, tmp_path):
    command = ["--", "raydeep", "run", "--epochs", "1"]
    wrong = one_line_error(cluster.submit(*command, token="not-the-token"))
    assert "refused the token" in wrong and "RAY_AUTH_TOKEN" in wrong
    # No token anywhere: not in the environment, and a HOME without ~/.ray/auth_token.
    missing = one_line_error(cluster.submit(*command, token=None, home=tmp_path))
    assert "needs a token and none was found" in missing


@pytest.mark.slow
def test_run_with_address_joins_the_cluster_from_one_of_its_nodes(cluster, tmp_path):
    """`raydeep run --address HOST:PORT` on a machine of the cluster (no job): the driver joins
    it, and the run's workers are spread over both nodes.

    Losing a node mid-run is tested on a `ray.cluster_utils.Cluster` (test_multinode.py):
    stopping the second node of this cluster while a job ran failed the run with an
    ActorDiedError in one of two fresh-clone runs (see issue 7)."""
    project = user_project(tmp_path)  # a user's module, from the directory the run starts in
    result = run_cli_process("run", "--address", f"127.0.0.1:{cluster.gcs}", "--strategy", "ps",
                     "--workers", "2", *TINY_USER, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--storage-path", str(tmp_path / "runs"), "--set", "resources.shared_storage=true",
                     cwd=project, timeout=300,
                     env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "placement (SPREAD) over 2 node(s)" in result.stdout, result.stdout[-2000:]
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = store.search_runs([store.get_experiment_by_name("raydeep").experiment_id])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert run.data.tags["raydeep.model_class_path"] == "clusternet:Net"


def test_unreachable_address_is_one_line(tmp_path):
    line = one_line_error(run_cli_process("submit", "--address", f"http://127.0.0.1:{free_port()}", "--",
                                  "raydeep", "run", cwd=tmp_path, timeout=60))
    assert "no Ray Jobs server answers at http://127.0.0.1:" in line
    # (a job id: without one, `jobs logs` is refused before any address is tried)
    line = one_line_error(run_cli_process("jobs", "logs", "raysubmit_x", "--address",
                                          f"http://127.0.0.1:{free_port()}", cwd=tmp_path, timeout=60))
    assert "no Ray Jobs server answers" in line


@pytest.mark.parametrize("sets, refused", [
    ({}, "resources.storage_path 'raydeep_runs' and tracking.uri 'sqlite:///mlflow.db' are local"),
    ({"tracking.uri": "http://mlflow:5000"}, "resources.storage_path 'raydeep_runs' is local"),
    ({"resources.storage_path": "/mnt/nfs/runs", "resources.shared_storage": True}, None),
    # an object store is shared; a SQLite tracking file still is not
    ({"resources.storage_path": "s3://bucket/runs"}, "tracking.uri 'sqlite:///mlflow.db' is local"),
    ({"resources.storage_path": "s3://bucket/runs", "tracking.uri": "http://mlflow:5000"}, None),
])
def test_storage_on_several_nodes(sets, refused):
    from cluster.storage import shared_storage_problem
    from pipelines import config

    run = config.load(overrides=sets)
    assert shared_storage_problem(run, nodes=1) is None
    problem = shared_storage_problem(run, nodes=3)
    assert (problem is None) if refused is None else (refused in problem and "\n" not in problem)


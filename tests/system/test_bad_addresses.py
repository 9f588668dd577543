"""Bad addresses and bad `submit`/`jobs` input through the command line as a user types it:
exit code 2, one line on stderr naming the problem, no traceback, within seconds, and no
Ray started (every case in the table is refused before Ray would start, so all run in this
process). The servers are real sockets: a port nobody listens on, a port that accepts and
says nothing, a web server that is not Ray; the cases that need Ray itself (an unknown job
id, the job spec a Jobs server keeps, the token's way) use a real `ray start --head`.
"""
from __future__ import annotations

import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port, free_ports, run_cli, run_cli_process

BOUND_S = 8.0
"""Each refusal's bound: the slowest waits 2-3 s for a port that says nothing."""




class Web(http.server.ThreadingHTTPServer):
    """A web server that is not Ray; it keeps the Authorization headers it was sent."""

    def __init__(self):
        self.authorizations: list[str] = []
        super().__init__(("127.0.0.1", 0), _Page)


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization"):
            self.server.authorizations.append(self.headers["Authorization"])
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>a web page, not Ray</html>")

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def ports():
    """nobody: a closed port; silent: accepts (the kernel's backlog) and never answers;
    web: an HTTP/1 server."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    web = Web()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    yield {"nobody": free_port(), "silent": silent.getsockname()[1], "web": web.server_address[1],
           "server": web}
    web.shutdown()
    silent.close()


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A fresh directory, no RAY_ADDRESS, no credentials of this machine's."""
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


R = "127.0.0.1"
NOBODY = ["--address", f"http://{R}:{{nobody}}"]
CASES = [
    # raydeep run / tune: the Ray address
    ({}, ["run", "--address", ""], "--address is empty"),
    ({}, ["run", "--address", " "], "--address is empty"),
    ({}, ["run", "--address", "host:"], "--address host: has no port"),
    ({}, ["run", "--address", ":123"], "--address :123 has no host"),
    ({}, ["run", "--address", f"{R}:0"], "the port must be in 1..65535, got 0"),
    ({}, ["run", "--address", f"{R}:70000"], "the port must be in 1..65535, got 70000"),
    ({}, ["run", "--address", f"{R}:six"], "the port 'six' is not a number"),
    ({}, ["run", "--address", "no-such-host.invalid:6379"], "the host 'no-such-host.invalid' does not resolve"),
    ({}, ["run", "--address", f"{R}:{{nobody}}"], f"--address {R}:{{nobody}}: no Ray cluster answers there"),
    ({}, ["run", "--address", f"{R}:{{silent}}"], "answers but is not a Ray cluster (it sent nothing back"),
    ({}, ["run", "--address", f"{R}:{{web}}"], "answers but is not a Ray cluster (a web server answers"),
    ({}, ["run", "--address", f"ray://{R}:{{nobody}}"], "no Ray cluster answers there"),
    ({}, ["run", "--address", f"ray://{R}:{{web}}"], "answers but is not a Ray cluster (a web server"),
    ({}, ["run", "--address", f"http://{R}:{{web}}"], "is a web address: raydeep run and tune join Ray at"),
    ({}, ["run", "--address", f"redis://{R}:6379"], "redis:// is not a Ray address"),
    ({}, ["run", "--set", f"resources.address={R}:{{silent}}"],
     f"resources.address {R}:{{silent}} answers but is not a Ray cluster"),  # named by its key
    ({"RAY_ADDRESS": f"{R}:{{web}}"}, ["run", "--set", f"resources.address={R}:{{nobody}}"],
     f"(RAY_ADDRESS={R}:{{web}} is not used: resources.address wins)"),
    ({}, ["run", "--strategy", "ps", "--address", f"{R}:{{silent}}"], "is not a Ray cluster"),
    ({}, ["tune", str(REPO / "tune_configs/strategies.yaml"), "--address", f"{R}:{{web}}"],
     "is not a Ray cluster (a web server"),
    ({"RAY_ADDRESS": f"{R}:{{nobody}}"}, ["run"], f"RAY_ADDRESS {R}:{{nobody}}: no Ray cluster answers there"),
    ({"RAY_ADDRESS": "garbage"}, ["run"], "RAY_ADDRESS garbage has no port"),
    ({"RAY_ADDRESS": f"{R}:{{web}}"}, ["run", "--address", f"{R}:{{silent}}"],
     f"(RAY_ADDRESS={R}:{{web}} is not used: --address wins)"),
    # raydeep submit: the job and its environment
    ({}, ["submit"], "nothing to submit"),
    ({}, ["submit", "--"], "nothing to submit"),
    ({}, ["submit", "--", "ls", "-l"], "the job must be a raydeep command"),
    ({}, ["submit", "--bogus", "--", "raydeep", "run"], "unrecognized arguments: --bogus"),
    ({}, ["submit", "--env", "NOEQUALS", "--", "raydeep", "run"], "--env takes KEY=VALUE, got 'NOEQUALS'"),
    ({}, ["submit", "--env", "=value", "--", "raydeep", "run"], "--env takes KEY=VALUE"),
    # (refused before any address is tried; the address names nobody, should that change)
    ({}, ["submit", *NOBODY, "--env", "AWS_SECRET_ACCESS_KEY=s3cr3t-value", "--", "raydeep", "run"],
     "--env AWS_SECRET_ACCESS_KEY=... is a secret"),
    ({}, ["submit", *NOBODY, "--env", "HF_TOKEN=s3cr3t-value", "--", "raydeep", "run"],
     "--env HF_TOKEN=... is a secret"),
    ({}, ["submit", *NOBODY, "--env", "DB=postgresql://u:s3cr3t-value@db/x", "--", "raydeep", "run"],
     "--env DB holds a password ('postgresql://u:***@db/x')"),
    ({}, ["submit", *NOBODY, "--", "raydeep", "run", "--tracking-uri", "http://u:s3cr3t-value@mlflow:5000"],
     "the job's command holds a password"),
    ({"MLFLOW_TRACKING_URI": "http://u:s3cr3t-value@mlflow:5000"}, ["submit", *NOBODY, "--", "raydeep", "run"],
     "MLFLOW_TRACKING_URI (set here) holds a password"),
    # raydeep submit / jobs: the Jobs server's address
    ({}, ["submit", "--address", "", "--", "raydeep", "run"], "--address is empty"),
    ({}, ["submit", "--address", f"ray://{R}:10001", "--", "raydeep", "run"], "is a Ray client address"),
    ({}, ["submit", "--address", f"ftp://{R}:8265", "--", "raydeep", "run"], "not ftp://"),
    ({}, ["submit", "--address", "http://host:", "--", "raydeep", "run"], "--address http://host: has no port"),
    ({}, ["submit", "--address", f"http://{R}:70000", "--", "raydeep", "run"], "got 70000"),
    ({}, ["submit", "--address", f"{R}:0", "--", "raydeep", "run"], "got 0"),
    ({}, ["submit", "--address", "http://no-such-host.invalid:8265", "--", "raydeep", "run"], "does not resolve"),
    ({}, ["submit", "--address", f"http://{R}:{{nobody}}", "--", "raydeep", "run"],
     f"no Ray Jobs server answers at http://{R}:{{nobody}}"),
    ({}, ["submit", "--address", f"http://{R}:{{web}}", "--", "raydeep", "run"],
     "is not a Ray Jobs server (GET /api/version gave HTTP 200 text/html"),
    ({}, ["submit", "--address", f"http://{R}:{{silent}}", "--", "raydeep", "run"], "does not answer within"),
    ({"RAY_ADDRESS": "no-such-host.invalid:6379"}, ["submit", "--", "raydeep", "run"],
     "RAY_ADDRESS=no-such-host.invalid:6379's Jobs server http://no-such-host.invalid:8265: the host"),
    ({"RAY_ADDRESS": f"http://{R}:{{web}}"}, ["submit", "--address", f"http://{R}:{{nobody}}", "--",
                                              "raydeep", "run"], "is not used: --address wins"),
    ({"RAY_API_SERVER_ADDRESS": f"http://{R}:{{web}}"}, ["jobs", "list"],
     f"RAY_API_SERVER_ADDRESS http://{R}:{{web}} answers but is not a Ray Jobs server"),
    ({}, ["jobs", "list", "--address", f"http://{R}:{{silent}}"], "does not answer within"),
    ({}, ["jobs", "logs", "--address", f"http://{R}:{{nobody}}"], "raydeep jobs logs needs a JOB_ID"),
    ({}, ["jobs", "stop"], "raydeep jobs stop needs a JOB_ID"),
    ({}, ["jobs", "list", "raysubmit_x"], "raydeep jobs list takes no JOB_ID"),
    ({}, ["jobs", "frobnicate"], "argument action: invalid choice: 'frobnicate'"),
    ({}, ["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("env, args, message", CASES,
                         ids=[" ".join([*(f"{k}=" for k in e), *a]) for e, a, _ in CASES])
def test_refused_in_one_line(ports, scratch, monkeypatch, env, args, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**ports))
    refused(scratch, [a.format(**ports) for a in args], message.format(**ports))


def refused(root: Path, args: list[str], message: str) -> str:
    """One line on stderr that names the problem, exit code 2, within BOUND_S, nothing
    written, no secret echoed and no Ray started."""
    ray = sys.modules.get("ray")
    ray_before = bool(ray and ray.is_initialized())
    started = time.monotonic()
    result = run_cli(*args, cwd=root)
    took = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
    assert lines[0].startswith("raydeep: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "s3cr3t-value" not in result.stderr
    assert took < BOUND_S, f"{args} took {took:.1f} s"
    assert not (root / "mlflow.db").exists() and not (root / "raydeep_runs").exists()
    ray = sys.modules.get("ray")
    assert bool(ray and ray.is_initialized()) == ray_before, "a refused command started Ray"
    return lines[0]


def test_a_dead_recorded_cluster_with_address_auto(ports, scratch, monkeypatch):
    """`--address auto` joins what the last `ray start` recorded; a dead one is said so."""
    record = scratch / "tmp" / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text(f"{R}:{ports['nobody']}")
    monkeypatch.setenv("RAY_TMPDIR", str(scratch / "tmp"))
    refused(scratch, ["run", "--address", "auto"],
            f"--address auto (the cluster of the last `ray start` here, {R}:{ports['nobody']}): "
            "no Ray cluster answers there")


class Head:
    """A real Ray head (`ray start --head`) with its Jobs server on every interface and token
    auth with a token of the test's own; stopped by killing its process group."""

    def __init__(self):
        self.token = secrets.token_hex(32)
        self.temp = tempfile.mkdtemp(prefix="rdb", dir="/tmp")  # short: Ray's socket paths
        self.gcs, self.dashboard, self.client, *others = free_ports(9)
        self.url = f"http://127.0.0.1:{self.dashboard}"
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
               "RAY_USAGE_STATS_ENABLED": "0",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        env.pop("RAY_ADDRESS", None)
        ports = [f"--{name}={port}" for name, port in zip((
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"), others)]
        self.log = open(Path(self.temp) / "head.out", "w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
             f"--port={self.gcs}", f"--dashboard-port={self.dashboard}", "--dashboard-host=0.0.0.0",
             f"--ray-client-server-port={self.client}", f"--temp-dir={self.temp}", "--num-cpus=1",
             "--object-store-memory=100000000", "--node-ip-address=127.0.0.1",
             "--disable-usage-stats", *ports],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 90) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"{self.url}/api/version", timeout=1,
                                headers={"Authorization": f"Bearer {self.token}"}).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        log = (Path(self.temp) / "head.out").read_text()[-2000:]
        self.stop()
        pytest.fail(f"the Ray head did not come up:\n{log}")

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + grace
            while time.time() < deadline and self.process.poll() is None:
                time.sleep(0.2)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    node = Head()
    node.wait()
    yield node
    node.stop()


def non_loopback_ip() -> str | None:
    """This machine's address on its network (no packet is sent: a UDP socket is only aimed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.slow
def test_against_a_real_head(head, ports, scratch, monkeypatch, capsys):
    """One head for the cases that need Ray: each is one line, and fast."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    for action in ("logs", "stop"):
        refused(scratch, ["jobs", action, "raysubmit_nosuch", "--address", head.url],
                f"no job 'raysubmit_nosuch' at {head.url}")
    # Ray's GCS speaks gRPC, not HTTP: the Jobs server is the dashboard's port
    refused(scratch, ["jobs", "list", "--address", f"127.0.0.1:{head.gcs}"], "it does not speak HTTP")
    # and the dashboard is not Ray's GCS
    refused(scratch, ["run", "--address", f"127.0.0.1:{head.dashboard}"], "a web server answers there")

    from cluster.ray_address import check, check_one

    check_one(f"127.0.0.1:{head.gcs}", "--address")  # a real GCS and client server pass the probe
    check_one(f"ray://127.0.0.1:{head.client}", "--address")
    # --address wins over RAY_ADDRESS, says so, and the process forgets RAY_ADDRESS (Ray's
    # state API and Jobs client would read it over the address joined)
    other = f"127.0.0.1:{ports['web']}"
    monkeypatch.setenv("RAY_ADDRESS", other)
    capsys.readouterr()
    assert check(f"127.0.0.1:{head.gcs}") == f"127.0.0.1:{head.gcs}"
    assert capsys.readouterr().err == (f"raydeep: joining --address 127.0.0.1:{head.gcs}; "
                                       f"RAY_ADDRESS={other} is not used\n")
    assert "RAY_ADDRESS" not in os.environ


@pytest.mark.slow
def test_address_wins_over_ray_address_and_the_token_goes_to_it_only(head, ports, scratch, monkeypatch):
    """Ray's Jobs client takes RAY_ADDRESS over the address it is given: the token went to
    whatever RAY_ADDRESS named. --address wins, and one line says RAY_ADDRESS is not used."""
    web = f"http://127.0.0.1:{ports['web']}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    monkeypatch.setenv("RAY_ADDRESS", web)
    result = run_cli("jobs", "list", "--address", head.url, cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"raydeep: using --address {head.url}; RAY_ADDRESS={web} is not used"]
    assert ports["server"].authorizations == []


@pytest.mark.slow
def test_the_token_over_plain_http_beyond_loopback_is_warned_of(head, scratch, monkeypatch):
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no address but loopback")
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    remote = run_cli("jobs", "list", "--address", f"http://{ip}:{head.dashboard}", cwd=scratch)
    assert remote.returncode == 0 and "submission id" in remote.stdout, remote.stderr
    assert remote.stderr.strip().splitlines() == [
        f"raydeep: warning: the Ray token goes to http://{ip}:{head.dashboard} unencrypted (plain http); "
        "use https:// or a tunnel to 127.0.0.1 (`ray dashboard CLUSTER.yaml`)"]
    local = run_cli("jobs", "list", "--address", head.url, cwd=scratch)
    assert local.returncode == 0 and local.stderr == "", local.stderr


@pytest.mark.slow
def test_no_secret_reaches_the_job_spec(head, scratch, monkeypatch):
    """A job's runtime_env and command are readable by anyone who reaches the Jobs API: the
    credentials set on this machine stay here (the submitted line names them), the
    settings (tracking server, region) go."""
    import requests

    values = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-aws", "AWS_SESSION_TOKEN": "s3cr3t-session",
              "AWS_ACCESS_KEY_ID": "AKIAS3CR3T", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-mlflow",
              "MLFLOW_TRACKING_TOKEN": "s3cr3t-mlflow-token"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    result = run_cli("submit", "--no-wait", "--address", head.url, "--env", "EPOCHS_NOTE=two",
                     "--", "python", "-c", "pass", cwd=REPO)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[0]
    record = requests.get(f"{head.url}/api/jobs/{job_id}", timeout=10,
                          headers={"Authorization": f"Bearer {head.token}"})
    assert record.ok, record.text
    env = record.json()["runtime_env"]["env_vars"]
    leaked = [key for key, value in values.items() if value in record.text or key in env]
    assert leaked == [], leaked
    assert head.token not in record.text
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000" and env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["EPOCHS_NOTE"] == "two"
    submitted = next(line for line in result.stderr.splitlines() if "submitted job" in line)
    assert "AWS_SECRET_ACCESS_KEY" in submitted and "not sent" in submitted


@pytest.mark.slow  # a process of its own: the note is for a command that starts its own Ray
def test_a_live_recorded_cluster_is_named_and_a_dead_one_ignored(head, tmp_path):
    """With no --address a run starts its own Ray. A cluster that `ray start` recorded and
    that answers is named in one line when that Ray starts (here the run then stops at
    resources its Ray cannot give), and not at all for a run refused before Ray starts. The
    record a killed `ray start` leaves is ignored: plain `ray.init()` would try to join it,
    raydeep starts its own Ray (the refusal names that Ray's resources) and says nothing."""
    short = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))  # Ray's socket paths must stay short
    record = short / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text(f"127.0.0.1:{head.gcs}")
    env = {"RAY_TMPDIR": str(short), "RAY_ADDRESS": ""}
    started = time.monotonic()
    refused = run_cli_process("run", "--strategy", "ps", "--tracking-uri", "file:///nowhere", cwd=tmp_path,
                              env=env, timeout=120)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "MLflow 3 refuses file stores" in lines[0], lines
    result = run_cli_process("run", "--strategy", "ps", "--gpus-per-worker", "1", "--num-cpus", "2",
                             cwd=tmp_path, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0] == (f"raydeep: a Ray cluster runs at 127.0.0.1:{head.gcs}; this run starts a Ray of "
                        f"its own (--address 127.0.0.1:{head.gcs} joins it)")
    assert "need 2 GPU in all, and the Ray cluster has 0" in lines[1], lines
    assert time.monotonic() - started < 90
    record.write_text("127.0.0.1:9\n")  # a dead cluster's leftover: nobody listens on the discard port
    # allreduce (Ray Train) would wait forever for the GPUs: they are compared with the
    # cluster's resources once its Ray is up, before any actor starts
    dead = run_cli_process("run", "--gpus-per-worker", "1", "--num-cpus", "2", cwd=tmp_path, env=env,
                           timeout=120)
    lines = dead.stderr.strip().splitlines()
    assert dead.returncode == 2 and len(lines) == 1, dead.stderr
    assert "the run's 2 actors need 2 GPU in all, and the Ray cluster has 0" in lines[0], lines
    assert not (tmp_path / "raydeep_runs").exists()
    shutil.rmtree(short, ignore_errors=True)

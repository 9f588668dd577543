"""Bad input through the command line as a user types it: one line on stderr naming the
problem, exit code 2, no traceback, nothing written, and no Ray started (every case is
checked before Ray would start, so all run in this process)."""
from __future__ import annotations

import socket

import pytest
from helpers import run_cli, run_cli_process


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (root / "twice.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    (root / "infinite.yaml").write_text("optim: {lr: .inf}\n")
    (root / "adir.yaml").mkdir()
    (root / "inf.csv").write_text("a,b,label\n" + "1.0,inf,0\n2.0,0.5,1\n" * 10)
    (root / "escape.yaml").write_text("name: ../outside\nbase: {strategy: {name: local}}\n"
                                      "space: {optim.lr: {choice: [0.1, 0.2]}}\nmetric: val_accuracy\n"
                                      "mode: max\n")
    return root


RUN = [
    (["--lr", "inf"], "config key 'optim.lr' must be a finite number, got 'inf'"),
    (["--lr", "nan"], "config key 'optim.lr' must be a finite number"),
    (["--set", "optim.momentum=nan"], "config key 'optim.momentum' must be a finite number"),
    (["--set", "optim.momentum=-0.5"], "optim.momentum must be in [0, 1), got -0.5"),
    (["--set", "optim.momentum=1"], "optim.momentum must be in [0, 1), got 1.0"),
    (["--set", "optim.weight_decay=-1"], "optim.weight_decay must be >= 0, got -1.0"),
    (["--set", "model.dropout=inf"], "config key 'model.dropout' must be a finite number"),
    (["{root}/infinite.yaml"], "config key 'optim.lr' must be a finite number, got inf"),
    (["{root}/binary.yaml"], "is not text (not UTF-8)"),
    (["{root}/twice.yaml"], "is not valid YAML (line 3): key 'lr' is given twice"),
    (["{root}/adir.yaml"], "does not exist (it is a directory)"),
    (["{root}/missing.yaml"], "config file '{root}/missing.yaml' does not exist"),
    (["--run-name", "../escape"], "tracking.run_name '../escape' must be a plain name"),
    (["--run-name", ".."], "tracking.run_name '..' must be a plain name"),
    (["--run-name", "a/b"], "tracking.run_name 'a/b' must be a plain name"),
    (["--set", "tracking.experiment= "], "tracking.experiment must not be empty"),
    (["--set", "resources.keep_checkpoints=0"], "resources.keep_checkpoints must be >= 1, got 0"),
    (["--data", "{root}/inf.csv"], "has infinite feature values"),
    (["--strategy", "ps", "--print-schedule"], "--print-schedule needs a strategy with a schedule"),
    (["--tracking-uri", "file:///tmp/mlruns"], "MLflow 3 refuses file stores; use a SQLite file"),
    (["--tracking-uri", "sqlite:////no/such/dir/m.db"], "the directory '/no/such/dir' does not exist"),
    (["--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers at http://127.0.0.1:9"),
    (["--tracking-uri", "htp://127.0.0.1:5000"], "'htp' is not a store MLflow opens"),
    (["--tracking-uri", "postgresql://u:secret@127.0.0.1/db"], "needs the psycopg2-binary package"),
    (["--strategy", "lbfgs", "--shards", "0"], "strategy.shards must be >= 1, got 0"),
]


@pytest.mark.parametrize("args, message", RUN, ids=[m for _, m in RUN])
def test_bad_run_input(files, args, message):
    _refused(files, ["run", *args], message)


def test_a_sweep_name_cannot_leave_the_store(files):
    _refused(files, ["tune", "{root}/escape.yaml"], "name '../outside' must be a plain name")


@pytest.fixture
def taken_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_bad_ui_addresses(files, taken_port):
    for args, message in [
        (["--port", "70000"], "--port must be in 1..65535, got 70000"),
        (["--port", "0"], "--port must be in 1..65535, got 0"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0 would let other machines read and write the runs"),
        (["--host", "no-such-host.invalid", "--allow-remote"], "is not an address of this machine"),
        (["--port", str(taken_port)], f"cannot listen on 127.0.0.1:{taken_port}"),
    ]:
        _refused(files, ["ui", *args], message)


def _refused(root, args, message):
    args = [a.format(root=root) for a in args]
    result = run_cli(*args, cwd=root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
    assert lines[0].startswith("raydeep: error: ") and message.format(root=root) in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
    assert not (root / "mlflow.db").exists() and not (root / "raydeep_runs").exists()


@pytest.mark.slow  # a process of its own starts its own Ray
def test_resources_the_cluster_cannot_give_are_refused_once_ray_is_up(tmp_path):
    """Ray would wait forever for them (Ray Train retries a worker group's start without end)."""
    result = run_cli_process("run", "--gpus-per-worker", "1", "--num-cpus", "2", cwd=tmp_path, timeout=180)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "the run's 2 actors need 2 GPU in all, and the Ray cluster has 0" in lines[0]
    assert not (tmp_path / "raydeep_runs").exists()

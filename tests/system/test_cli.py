"""The `raydeep` command line as a user types it: listings, bad input, a real run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, run_cli, run_cli_process
from mlflow.tracking import MlflowClient


def test_models_and_strategies_are_listed(tmp_path):
    models = run_cli("models", cwd=tmp_path)
    assert models.returncode == 0
    for line in ("mlp ", "cnn ", "rnn ", "depth=2", "channels=[32, 64]", "layers=1", "--model my_module:MyNet"):
        assert line in models.stdout
    strategies = run_cli("strategies", cwd=tmp_path)
    assert strategies.returncode == 0
    assert all(name in strategies.stdout for name in ("allreduce", "diloco", "lbfgs", "local", "pipeline", "ps"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    pq.write_table(pa.table({"a": [1.0, 2.0] * 20, "b": [0.5, 0.1] * 20, "label": [0, 1] * 20}),
                   root / "good.parquet")
    pq.write_table(pa.table({"a": [1.0] * 20, "s": ["x"] * 20, "label": [0, 1] * 10}),
                   root / "text.parquet")
    (root / "notes.txt.json").write_text("{}")
    (root / "run.yaml").write_text("model:\n  name: mlp\n  bogus: 1\n")
    return root


BAD_INPUTS = [
    (["--model", "resnet"], "unknown model 'resnet' (known: "),
    (["--strategy", "magic"], "unknown strategy 'magic' (known: allreduce, diloco, lbfgs, local, pipeline, ps)"),
    (["--set", "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["--epochs", "ten"], "config key 'optim.epochs' expects int, got 'ten'"),
    (["--workers", "0"], "resources.workers must be >= 1, got 0"),
    (["--data", "{root}/missing.parquet"], "data file '{root}/missing.parquet' does not exist"),
    (["--data", "{root}/notes.txt.json"], "is not Parquet (.parquet) or CSV (.csv)"),
    (["--data", "{root}/good.parquet", "--label", "y"], "has no label column 'y'"),
    (["--data", "{root}/text.parquet"], "non-numeric feature columns: s"),
    (["--data", "{root}/good.parquet", "--input-shape", "3,1", "--batch-size", "4"],
     "data.input_shape [3, 1] holds 3 values but each example of"),
    (["--set", "optim.lr"], "--set 'optim.lr' needs the form key=value"),
    (["--tracking-uri", "mlflow.db"], "tracking.uri 'mlflow.db' is not a URI"),
    (["--resume", "never-ran"], "--resume 'never-ran': no run of that name under"),
    (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: no Ray cluster answers there"),
    (["{root}/run.yaml"], "unknown config key 'model.bogus'"),
    (["--model", "cnn", "--set", "model.channels=[4,4,4,4]"], "too many stages"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(files, args, message):
    args = [a.format(root=files) for a in args]
    # A Ray address is refused by a process of its own: this one may hold the session's Ray.
    runner = run_cli_process if "--address" in args else run_cli
    result = runner("run", *args, cwd=files, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == lines[0].strip() and lines[0].startswith("raydeep: error: ")
    assert message.format(root=files) in lines[0]
    assert "Traceback" not in result.stderr and not (files / "mlflow.db").exists()


def test_unknown_flag_and_missing_command(tmp_path):
    for args in (["run", "--frobnicate"], [], ["launch"]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("raydeep: error: ")


def test_diverging_run_fails_cleanly_and_is_marked_failed(tmp_path):
    result = run_cli("run", "--strategy", "local", "--lr", "1e12", "--epochs", "2",
                     "--run-name", "boom", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "training loss became" in result.stderr.strip().splitlines()[-1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "boom"
    assert "training loss became" in run.data.tags["error"]


@pytest.mark.slow
def test_main_job_mlp_allreduce_reaches_097_and_is_recorded(tmp_path):
    """The README's main job, through the CLI with its embedded Ray and local MLflow store,
    with its defaults: the MLP's recipe under allreduce (tune_configs/recipes/mlp.yaml)."""
    from pipelines import recipes

    epochs = recipes.settings("mlp", "allreduce")["optim"]["epochs"]
    result = run_cli_process("run", "--num-cpus", "2", cwd=tmp_path, recipe=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"epoch {epochs}/{epochs}" in result.stdout + result.stderr
    assert "recipe mlp/allreduce (tune_configs/recipes/mlp.yaml): " in result.stdout
    # A quiet terminal: Ray's C++ lines, its note on token authentication and MLflow's
    # database set-up stay in their log files.
    for noise in (".cc:", "Token authentication", "Creating initial MLflow database tables"):
        assert noise not in result.stdout + result.stderr, (noise, result.stderr[-3000:])
    assert "time_to_first_step_s" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] >= 0.97
    assert f"MLflow run {run.info.run_id}" in result.stdout
    assert "test_accuracy" in result.stdout
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_s", "test_loss"):
        assert len(client.get_metric_history(run.info.run_id, key)) >= 1, key
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == epochs
    assert run.data.params["resources.workers"] == "2" and run.data.params["recipe"] == "mlp/allreduce"
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_ray_internal_lines_are_dropped_unless_verbose(monkeypatch):
    """What `filter_worker_logs` installs on the driver: Ray's C++ lines from workers go,
    everything else (raydeep's lines, Python warnings) is forwarded; `--verbose` keeps all."""
    from cluster import connect

    seen = []
    forward = connect._without_internal_lines(seen.append)
    lines = ["[2026-11-29 20:16:25,403 E 21810 21838] core_worker.cc:2465: Actor with class name ...",
             "epoch 1/2  train_loss 2.2136",
             "2026-11-29 20:16:25,403\tWARNING worker.py:12 -- a real warning"]
    forward({"lines": lines, "pid": 1, "is_err": True})
    assert seen == [{"lines": lines[1:], "pid": 1, "is_err": True}]
    forward({"lines": lines[:1], "pid": 1, "is_err": True})
    assert len(seen) == 1, "a batch of internal lines only is not forwarded at all"
    # A killed actor's handle collected under Ray's SIGTERM handler (seen from a ps worker
    # that the driver killed at the end of its run, in another run's captured stderr)
    dying = ["Exception ignored in: <function ActorHandle.__del__ at 0x7f5bc5c86480>",
             "Traceback (most recent call last):", '  File ".../ray/actor.py", line 2467, in __del__',
             "    def __del__(self):", "", "SystemExit: 1"]
    forward({"lines": [lines[1], *dying, lines[2]], "pid": 2, "is_err": True})
    assert seen[-1]["lines"] == [lines[1], lines[2]]
    monkeypatch.delenv(connect.VERBOSE_ENV, raising=False)
    assert not connect.verbose()
    monkeypatch.setenv(connect.VERBOSE_ENV, "1")
    assert connect.verbose()
    assert build_parser_flags("run", "--verbose").verbose


def build_parser_flags(*argv):
    from cluster.cli import build_parser

    return build_parser().parse_args(list(argv))


def _start_and_stop(workdir: Path, name: str, sig: int, epochs: int = 50) -> tuple[int, str]:
    """A local run in a process of its own, sent `sig` once its first epoch is checkpointed."""
    command = [sys.executable, "-m", "cluster.cli", "run", "--strategy", "local", "--run-name", name,
               "--epochs", str(epochs), "--set", "tracking.log_model=false"]
    run = subprocess.Popen(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = workdir / "raydeep_runs" / name / "checkpoint_epoch_00000" / "complete.json"
    deadline = time.time() + 120
    while not checkpoint.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be stopped"
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=120)
    return run.returncode, stderr


@pytest.mark.slow  # two runs in processes of their own
def test_sigterm_marks_the_run_killed_and_a_sigkilled_one_resumes_as_a_new_attempt(workdir, store):
    client = MlflowClient(store)
    code, stderr = _start_and_stop(workdir, "term", signal.SIGTERM)
    assert code == 130 and "marked KILLED" in stderr and "Traceback" not in stderr, stderr
    (term,) = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id],
                                 filter_string="attributes.run_name = 'term'")
    assert term.info.status == "KILLED"

    code, _ = _start_and_stop(workdir, "lost", signal.SIGKILL)
    assert code == -signal.SIGKILL
    (run,) = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id],
                                filter_string="attributes.run_name = 'lost'")
    assert run.info.status == "RUNNING"  # nobody could end it
    resumed = run_cli("run", "--resume", "lost", "--epochs", "2", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raydeep.attempts"] == "2"
    assert run.data.tags["raydeep.attempt_1"].startswith("lost")

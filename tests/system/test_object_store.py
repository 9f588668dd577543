"""Runs kept on an S3 object store: moto's S3 server, a real HTTP server speaking the S3 API,
run in its own process on a free port and reached through pyarrow's S3 filesystem, as a
MinIO or AWS bucket would be.

The credentials travel in the URI (`s3://KEY:SECRET@bucket/...`): the session's Ray workers
were started before this module and do not see variables it sets. `allreduce` on a bucket
(Ray Train's workers writing, restarting from and resuming from its checkpoints there) is in
tests/strategies/test_allreduce.py, whose one worker group checks that too.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from helpers import REPO, moto_bucket, run_cli, small_run
from helpers import bucket_listing as listing
from mlflow.tracking import MlflowClient

import pipelines

pytestmark = pytest.mark.slow

pytest.importorskip("moto")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """`s3://...` of a fresh bucket on a moto S3 server; yields (uri, pyarrow filesystem)."""
    with moto_bucket(tmp_path_factory.mktemp("moto")) as made:
        yield made



def test_run_checkpoints_to_the_bucket_and_resumes_from_it(bucket, workdir, store):
    uri, fs = bucket
    common = ["--strategy", "local", "--storage-path", uri, "--tracking-uri", store,
              "--set", "tracking.log_model=false", "--set", "optim.steps_per_epoch=4"]
    first = run_cli("run", "--run-name", "on-s3", "--epochs", "3", *common, cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    # the marker and the two newest checkpoints; nothing of the run on the local disk
    assert listing(fs, "runs/raydeep/on-s3") == ["checkpoint_epoch_00001", "checkpoint_epoch_00002",
                                                 "raydeep_run.json"]
    assert not (workdir / "raydeep_runs").exists()
    raw_marker = fs.open_input_stream("runs/raydeep/on-s3/raydeep_run.json").read().decode()
    marker = json.loads(raw_marker)
    assert "test:test@" not in raw_marker and "s3://test:***@runs" in raw_marker  # no secret on the bucket

    again = run_cli("run", "--resume", "on-s3", "--epochs", "4", *common, cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    # continued from epoch 3's state, downloaded from the bucket, not from scratch
    assert "epoch 4/4" in again.stdout and "epoch 3/4" not in again.stdout, again.stdout
    assert listing(fs, "runs/raydeep/on-s3")[:2] == ["checkpoint_epoch_00002", "checkpoint_epoch_00003"]
    client = MlflowClient(store)
    run = client.get_run(marker["mlflow_run_id"])  # the same MLflow run, continued
    assert run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == {0, 1, 2, 3}
    # the secret in the URI is not shown to whoever browses the runs
    assert run.data.params["resources.storage_path"].startswith("s3://test:***@runs/raydeep?")

    taken = run_cli("run", "--run-name", "on-s3", "--epochs", "1", *common, cwd=workdir)
    assert taken.returncode == 2 and "already has a run under" in taken.stderr


@pytest.mark.parametrize("storage_uri, says", [
    (lambda server: "nosuch://bucket/runs", "resources.storage_path 'nosuch://bucket/runs' cannot be opened"),
    # nobody listens on port 1; the secret stays out of the message
    (lambda server: "s3://key:secret@runs/x?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1",
     "resources.storage_path 's3://key:***@runs/x?endpoint_override=127.0.0.1:1&scheme=http"
     "&region=us-east-1' cannot be reached: "),
    (lambda server: server.replace("test:test@runs/raydeep", "test:secret@nobucket/x"),
     "bucket 'nobucket' does not exist"),
])
def test_bad_storage_uris_are_one_line(bucket, workdir, storage_uri, says):
    where = storage_uri(bucket[0])
    result = run_cli("run", "--storage-path", where, "--epochs", "1", cwd=workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert "secret" not in result.stderr


def test_sweep_keeps_tune_state_and_best_config_on_the_bucket(bucket, ray_session, workdir, store):
    from pipelines.sweep.config import load
    from pipelines.sweep.runner import run_sweep

    uri, fs = bucket
    path = workdir / "sweep.yaml"
    path.write_text(f"""
name: s3sweep
base:
  model: {{name: mlp, depth: 1, width: 32}}
  strategy: {{name: local}}
  optim: {{name: adam, lr: 0.003, epochs: 2, steps_per_epoch: 3}}
  tracking: {{uri: "{store}", log_model: false}}
  resources: {{storage_path: "{uri}"}}
space:
  optim.lr: {{grid: [0.003, 0.01]}}
metric: val_accuracy
mode: max
""")
    result = run_sweep(load(path))
    assert result.count("FINISHED") == 2
    (name,) = listing(fs, "runs/raydeep/sweeps")
    assert name == result.directory.name and name.startswith("s3sweep-")
    held = listing(fs, f"runs/raydeep/sweeps/{name}")
    assert {"raydeep_sweep.json", "best_config.yaml", "tune"} <= set(held), held
    best = fs.open_input_stream(f"runs/raydeep/sweeps/{name}/best_config.yaml").read().decode()
    assert "test:test@" not in best and "s3://test:***@runs" in best  # logged and uploaded: no secret
    import pyarrow.fs

    stored = fs.get_file_info(pyarrow.fs.FileSelector(f"runs/raydeep/sweeps/{name}/tune", recursive=True))
    assert any("/checkpoint_" in f.path for f in stored), "no trial checkpoint on the bucket"
    # Tune's experiment, with the trials' checkpoints, is on the bucket, and resumes from it
    again = run_sweep(load(path), resume="latest")
    assert again.parent_run_id == result.parent_run_id and again.count("FINISHED") == 2
    assert MlflowClient(store).get_run(result.parent_run_id).info.status == "FINISHED"


def test_a_run_killed_mid_upload_resumes_from_the_last_whole_checkpoint(bucket, workdir, store):
    """SIGKILL of the driver while epoch 1's checkpoint is on its way to the bucket (its
    state file's multipart upload under way): that checkpoint never becomes one, epoch 0's
    stays, and `--resume` continues from epoch 0 in the same MLflow run."""
    import os
    import signal
    from urllib.parse import parse_qs, urlparse

    import boto3

    from pipelines.storage import newest_state

    uri, fs = bucket
    s3 = boto3.client("s3", endpoint_url=f"http://{parse_qs(urlparse(uri).query)['endpoint_override'][0]}",
                      aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    # 8.5M parameters and their momentum: a 68 MB state, uploaded in parts.
    common = ["--strategy", "local", "--storage-path", uri, "--tracking-uri", store,
              "--set", "tracking.log_model=false", "--set", "optim.steps_per_epoch=2",
              "--set", "model.width=2048", "--set", "model.depth=3", "--run-name", "cut-short"]
    first = subprocess.Popen([sys.executable, "-m", "cluster.cli", "run", "--epochs", "3", *common],
                             cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             start_new_session=True)
    uploading = "raydeep/cut-short/checkpoint_epoch_00001/state.pt"
    pending = []
    try:
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline:
            pending = s3.list_multipart_uploads(Bucket="runs", Prefix=uploading).get("Uploads", [])
            if pending:
                os.killpg(first.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        assert pending, "the run ended (or timed out) before its second checkpoint's upload was seen"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    run_dir = "runs/raydeep/cut-short"
    assert "complete.json" not in listing(fs, f"{run_dir}/checkpoint_epoch_00001")
    assert newest_state(uri.replace("raydeep?", "raydeep/cut-short?"))["epoch"] == 0

    again = run_cli("run", "--resume", "cut-short", "--epochs", "3", *common[:-2], cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "epoch 2/3" in again.stdout and "epoch 1/3" not in again.stdout, again.stdout
    assert listing(fs, run_dir) == ["checkpoint_epoch_00001", "checkpoint_epoch_00002", "raydeep_run.json"]
    assert "complete.json" in listing(fs, f"{run_dir}/checkpoint_epoch_00001")  # written again, whole
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id],
                                filter_string="attributes.run_name = 'cut-short'")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [0, 1, 2]


def test_a_table_split_over_files_on_the_bucket_trains_as_the_same_files_on_disk(
        bucket, ray_session, workdir, store):
    """`--data s3://.../dir/` reads every Parquet file under it (here the digits, 64 pixel
    columns, in three files); the same files on the local disk give the very same run, read
    whole or streamed (Ray Data's read tasks opening the bucket)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines import split

    uri, fs = bucket
    pixels, labels = split.digits()
    table = pa.table({**{f"p{i}": pixels[:, i].astype(np.float32) for i in range(64)},
                      "label": labels.astype(np.int64)})
    local = workdir / "digits"
    local.mkdir()
    for i, start in enumerate(range(0, len(labels), 600)):
        chunk = table.slice(start, 600)
        pq.write_table(chunk, local / f"part-{i}.parquet")
        with fs.open_output_stream(f"runs/tables/digits/part-{i}.parquet") as out:
            pq.write_table(chunk, out)
    remote = uri.replace("runs/raydeep?", "runs/tables/digits/?")
    common = {"tracking.uri": store, "optim.epochs": 2, "optim.steps_per_epoch": 6}
    on_bucket = pipelines.train(small_run(**common, **{"data.source": remote, "tracking.run_name": "bucket"}))
    on_disk = pipelines.train(small_run(**common, **{"data.source": str(local), "tracking.run_name": "disk"}))
    for key, value in on_disk.model.state_dict().items():
        assert torch.equal(on_bucket.model.state_dict()[key], value), key
    assert on_bucket.metrics["test_accuracy"] == on_disk.metrics["test_accuracy"]
    # Streamed: Ray Data's read tasks open the bucket (actors reading it, a ps worker, pipeline
    # stages, diloco workers and Ray Train's split, are in tests/strategies/test_streaming.py)
    streamed = {**common, "data.stream": True}
    from_bucket = pipelines.train(small_run(**streamed, **{"data.source": remote, "tracking.run_name": "bucket-s"}))
    from_disk = pipelines.train(small_run(**streamed, **{"data.source": str(local), "tracking.run_name": "disk-s"}))
    for key, value in from_disk.model.state_dict().items():
        assert torch.equal(from_bucket.model.state_dict()[key], value), key
    # the secret in the URI is not shown to whoever browses the runs
    params = MlflowClient(store).get_run(on_bucket.run_id).data.params
    assert params["data.source"].startswith("s3://test:***@runs/tables/digits/?")

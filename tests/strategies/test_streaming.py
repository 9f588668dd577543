"""Training on a streamed table (`data.stream`): Ray Data reads the training rows in every
epoch, under `local` on the driver and under `allreduce` as Ray Train's dataset shards."""
import math

import pytest
from helpers import digits_table, run_cli, small_run
from mlflow.tracking import MlflowClient

import pipelines
from pipelines import data
from pipelines.config import DataSection
from pipelines.streaming import Streamed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_parts(tmp_path_factory):
    return digits_table(tmp_path_factory.mktemp("stream"))


def test_an_epochs_batches_follow_the_seed_and_change_with_the_epoch(ray_session, digits_parts):
    table = data.load(DataSection(source=str(digits_parts), stream=True)).stream
    reader = Streamed(table.training_dataset(seed=5, on_driver=True))
    whole_epoch = [(x[:2].sum().item(), len(y)) for x, y in reader.epoch(64, seed=5, epoch=0)]
    assert sum(n for _, n in whole_epoch) == table.rows // 64 * 64  # every row but a last partial batch
    first = [value for value, _ in whole_epoch[:3]]
    second = [x[:2].sum().item() for x, _ in reader.epoch(64, seed=5, epoch=1, cap=3)]
    assert second != first  # another epoch, another order of files and rows
    # a new run's reader (its executions counted from 0) gives the same batches: the local
    # loop, deterministic given its batches, the same bits
    again = Streamed(table.training_dataset(seed=5, on_driver=True))
    assert [x[:2].sum().item() for x, _ in again.epoch(64, seed=5, epoch=0, cap=3)] == first


def test_a_streamed_table_trains_to_the_in_memory_accuracy_under_local_and_allreduce(ray_session, digits_parts, store):
    common = {"tracking.uri": store, "data.source": str(digits_parts), "optim.epochs": 3, "optim.lr": 0.1}
    whole = pipelines.train(small_run(**common))
    local = pipelines.train(small_run(**common, **{"data.stream": True}))
    # Another split (a hash of each row instead of a stratified draw) and order: the same
    # accuracy within 3 standard errors of a test accuracy on ~360 rows.
    tests = len(data.load(DataSection(source=str(digits_parts), stream=True)).y_test)
    margin = 3 * math.sqrt(0.25 / tests)
    assert local.metrics["test_accuracy"] >= whole.metrics["test_accuracy"] - margin, (local.metrics, whole.metrics)
    # a user's own ray.data.Dataset, through the Python API: streamed the same way
    import ray.data

    theirs = pipelines.train(small_run(**{**common, "data.source": "digits", "optim.epochs": 2}),
                             table=ray.data.read_parquet(str(digits_parts)))
    assert theirs.metrics["test_accuracy"] >= whole.metrics["test_accuracy"] - margin, theirs.metrics
    run = MlflowClient(store).get_run(theirs.run_id)
    assert run.data.tags["raydeep.data"] == "ray.data.Dataset" and run.data.params["data.stream"] == "True"
    # allreduce: two workers, each its share of every epoch through get_dataset_shard
    result = run_cli("run", "--strategy", "allreduce", "--data", str(digits_parts), "--stream", "--epochs", "3",
                     "--lr", "0.1", "--tracking-uri", store, "--run-name", "streamed", "--set",
                     "tracking.log_model=false", "--set", "tracking.figures=false", cwd=digits_parts.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split(" not in result.stderr + result.stdout  # no Ray Data progress bars on the terminal
    run = next(r for r in MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("raydeep").experiment_id]) if r.info.run_name == "streamed")
    assert run.info.status == "FINISHED" and run.data.params["data.stream"] == "True"
    assert run.data.metrics["test_accuracy"] >= whole.metrics["test_accuracy"] - margin, run.data.metrics

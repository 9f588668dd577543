"""Training on a streamed table (`data.stream`): Ray Data reads the training rows in every
epoch, under `local` on the driver, under `allreduce` as Ray Train's dataset shards, in each
`ps` worker (its own part), in a pipeline's first and last stages and in every `diloco`
worker (the whole stream, its share of each global batch); `lbfgs` portions read their files.
The same files lie on a local disk and on an S3 bucket (a moto server): every strategy
streams from the bucket in one of these tests, the tests of order and of accuracy against
in-memory data read the disk."""
import math

import pytest
import torch
from helpers import digits_table, float32_iterate_tolerance, moto_bucket, run_cli, small_run
from mlflow.tracking import MlflowClient

import pipelines
from pipelines import data
from pipelines.config import DataSection
from pipelines.streaming import Streamed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_parts(tmp_path_factory):
    return digits_table(tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="module")
def digits_on_bucket(tmp_path_factory, digits_parts):
    """`s3://...` of the same Parquet files on a moto S3 server."""
    pytest.importorskip("moto")
    with moto_bucket(tmp_path_factory.mktemp("moto")) as (uri, fs):
        for path in sorted(digits_parts.glob("*.parquet")):
            with fs.open_output_stream(f"runs/tables/digits/{path.name}") as out:
                out.write(path.read_bytes())
        yield uri.replace("runs/raydeep?", "runs/tables/digits/?")


def test_an_epochs_batches_follow_the_seed_and_change_with_the_epoch(ray_session, digits_parts):
    table = data.load(DataSection(source=str(digits_parts), stream=True)).stream
    reader = Streamed(table=table, on_driver=True)
    whole_epoch = [(x[:2].sum().item(), len(y)) for x, y in reader.epoch(64, seed=5, epoch=0)]
    assert sum(n for _, n in whole_epoch) == table.rows // 64 * 64  # every row but a last partial batch
    first = [value for value, _ in whole_epoch[:3]]
    second = [x[:2].sum().item() for x, _ in reader.epoch(64, seed=5, epoch=1, cap=3)]
    assert second != first  # another epoch, another order of files and rows
    # a new run's reader gives the same batches: the local loop, deterministic given its
    # batches, the same bits
    again = Streamed(table=table, on_driver=True)
    assert [x[:2].sum().item() for x, _ in again.epoch(64, seed=5, epoch=0, cap=3)] == first
    # two readers' parts (every other file of four) hold every training row once
    def rows(dataset):
        return sorted((int(r["y"]), float(r["x"].sum())) for r in dataset.take_all())

    parts = [rows(table.training_dataset(5, True, part=(k, 2), epoch=0)) for k in range(2)]
    assert min(map(len, parts)) > 0 and sorted(parts[0] + parts[1]) == rows(table.training_dataset(5, True))


def test_a_streamed_table_trains_to_the_in_memory_accuracy_under_local_ps_and_allreduce(
        ray_session, digits_parts, digits_on_bucket, store):
    common = {"tracking.uri": store, "data.source": str(digits_parts), "optim.epochs": 2, "optim.lr": 0.1}
    whole = pipelines.train(small_run(**common))
    local = pipelines.train(small_run(**common, **{"data.stream": True}))
    # Another split (a hash of each row instead of a stratified draw) and order: the same
    # accuracy within 3 standard errors of a test accuracy on ~360 rows.
    tests = len(data.load(DataSection(source=str(digits_parts), stream=True)).y_test)
    margin = 3 * math.sqrt(0.25 / tests)
    assert local.metrics["test_accuracy"] >= whole.metrics["test_accuracy"] - margin, (local.metrics, whole.metrics)
    # a user's own ray.data.Dataset, through the Python API, under two asynchronous ps
    # workers: each reads the rows whose hash falls in its part
    import ray.data

    theirs = pipelines.train(small_run(**{**common, "data.source": "digits", "strategy.name": "ps",
                                          "resources.workers": 2}),
                             table=ray.data.read_parquet(str(digits_parts)))
    assert theirs.metrics["test_accuracy"] >= whole.metrics["test_accuracy"] - margin, theirs.metrics
    run = MlflowClient(store).get_run(theirs.run_id)
    assert run.data.tags["raydeep.data"] == "ray.data.Dataset" and run.data.params["data.stream"] == "True"
    # allreduce: two workers, each its share of every epoch through get_dataset_shard, read
    # from the bucket by Ray Data's tasks
    result = run_cli("run", "--strategy", "allreduce", "--data", digits_on_bucket, "--stream", "--epochs", "2",
                     "--lr", "0.1", "--tracking-uri", store, "--run-name", "streamed", "--set",
                     "tracking.log_model=false", "--set", "tracking.figures=false", cwd=digits_parts.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split(" not in result.stderr + result.stdout  # no Ray Data progress bars on the terminal
    run = next(r for r in MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("raydeep").experiment_id]) if r.info.run_name == "streamed")
    assert run.info.status == "FINISHED" and run.data.params["data.stream"] == "True"
    assert run.data.metrics["test_accuracy"] >= whole.metrics["test_accuracy"] - margin, run.data.metrics


STAGED = {"optim.epochs": 2, "optim.steps_per_epoch": 4, "data.batch_size": 32, "model.depth": 3,
          "model.width": 32, "data.stream": True, "optim.lr": 0.1}


def test_a_ps_worker_pipeline_stages_and_diloco_workers_stream_what_local_streams(ray_session, digits_on_bucket,
                                                                                   store):
    """All of them, and the reference, from the bucket."""
    common = {**STAGED, "tracking.uri": store, "data.source": digits_on_bucket}
    reference = pipelines.train(small_run(**common))
    losses = [h["train_loss"] for h in reference.history]
    assert losses[1] < losses[0], losses  # the weights moved: the comparison proves something
    local = reference.model.state_dict()
    # The pipeline's first stage reads the inputs and its last the labels of the same
    # batches; one ps worker with staleness 0 takes local's steps. Tolerances: as in
    # test_pipeline.py and test_param_server.py (another summation order of the same
    # mini-batches' gradients, bounded there).
    piped = pipelines.train(small_run(**common, **{"strategy.name": "pipeline", "strategy.stages": 2,
                                                   "strategy.microbatches": 4})).model.state_dict()
    served = pipelines.train(small_run(**common, **{"strategy.name": "ps", "resources.workers": 1,
                                                    "strategy.staleness": 0})).model.state_dict()
    # Two diloco workers reading the whole stream, each its half of every global batch, and
    # averaging after every step: SGD with momentum is linear in the gradients, so the mean of
    # their steps is local's step on the whole batch (the bound of test_diloco.py's in-memory
    # case: the workers' and driver's roundings of theta - delta, a few u per step).
    averaged = pipelines.train(small_run(**common, **{
        "strategy.name": "diloco", "resources.workers": 2, "strategy.sync_every": 1,
        "strategy.outer_lr": 1.0, "strategy.outer_momentum": 0.0}))
    assert [h["syncs"] for h in averaged.history] == [4, 4], (averaged.metrics, averaged.history)
    for key, value in local.items():
        torch.testing.assert_close(piped[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(served[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(averaged.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_lbfgs_portions_read_their_files_and_take_torchs_steps(ray_session, digits_parts, digits_on_bucket, store,
                                                               workdir):
    """Each L-BFGS evaluation reads its portion's files (every other file of four, on the bucket) chunk by
    chunk; torch.optim.LBFGS over the same rows summed in the same order is the reference,
    within the float32 bound of test_lbfgs.py (the portions' gradients are added in another
    association than one .grad accumulating them all). Two workers or one: the very same bits."""
    from pipelines.context import RunContext
    from pipelines.storage import RunDir
    from pipelines.strategies.lbfgs.driver import Sandblaster
    from pipelines.strategies.lbfgs.streamed import portion_chunks
    from pipelines.tracking import Tracker
    from pipelines.training.flat import flat_parameters
    from pipelines.training.loop import build_model

    def run_for(workers):
        return small_run(**{"tracking.uri": store, "data.source": digits_on_bucket, "data.stream": True,
                            "strategy.name": "lbfgs", "resources.workers": workers, "strategy.portions": 2,
                            "strategy.shards": 1, "strategy.iterations_per_epoch": 3,
                            "strategy.max_evals_per_epoch": 250, "model.width": 16, "model.depth": 1})

    def iterates(run):
        name = f"streamed-lbfgs-{run.resources.workers}"
        context = RunContext(run, Tracker.start(store, "lbfgs-streamed", name, {}), RunDir(name, workdir / name))
        driver, seen = Sandblaster(run, data.load(run.data, run.seed), context), []
        try:
            driver.lbfgs.epoch(0, lambda it: seen.append(driver.lbfgs.shards.gather("x")))
        finally:
            driver.close()
        return seen

    run = run_for(2)
    ours = iterates(run)
    table = data.load(run.data, run.seed).stream
    model = build_model(run, data.load(run.data, run.seed)).train()
    o = run.strategy.options
    optimizer = torch.optim.LBFGS(model.parameters(), lr=o.lr, max_iter=1, max_eval=o.max_evals_per_epoch,
                                  tolerance_grad=o.tolerance_grad, tolerance_change=o.tolerance_change,
                                  history_size=o.history, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        total = 0.0
        for portion in range(2):
            for x, y in portion_chunks(table, portion, 2):
                loss = model.loss((x, y)) * (len(y) / table.rows)
                loss.backward()
                total += float(loss.detach())
        return torch.tensor(total)

    reference = []
    for _ in range(3):
        optimizer.step(closure)
        reference.append(flat_parameters(model).clone())
    for k, (x, x_torch) in enumerate(zip(ours, reference)):
        bound = float32_iterate_tolerance(x_torch, k + 1, x.numel())
        torch.testing.assert_close(x, x_torch, rtol=0, atol=bound, msg=lambda m: f"iteration {k + 1}: {m}")
    assert not torch.equal(reference[-1], reference[0]), "the iterates did not move"
    alone = iterates(run_for(1))
    assert all(torch.equal(a, b) for a, b in zip(ours, alone)), "one worker read other bits than two"
    # batch norm's statistics need a portion in memory: refused in one line before anything starts
    import pipelines.run
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="model cnn has batch norm, whose statistics lbfgs computes"):
        pipelines.run.prepare(small_run(**{"tracking.uri": store, "data.source": str(digits_parts),
                                           "data.stream": True, "data.input_shape": [1, 8, 8],
                                           "strategy.name": "lbfgs", "model.name": "cnn",
                                           "model.batch_norm": True}))

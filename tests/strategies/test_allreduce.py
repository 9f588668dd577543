"""Tier 2/3: allreduce on a real local Ray (Ray Train, DDP over gloo) against the reference.

A Ray Train worker group takes about 14 s to start here, so one run checks several things:
the allreduce run that must equal the reference keeps its checkpoints on an S3 bucket (a
moto server, as in tests/system/test_object_store.py), loses a worker on the way (Ray Train
restarts the group from the newest checkpoint on the bucket, so the weights must still
equal `local`'s), and is then resumed from the bucket. The course's CNN bar holds for
allreduce because it computes `local`'s steps; the bar itself is checked under `local`
(tests/unit/test_quality.py).
"""
import os
import signal

import pytest
import torch
from helpers import TrainingInBackground, bucket_listing, live_actor_pids, moto_bucket, small_run
from mlflow.tracking import MlflowClient

import pipelines
from pipelines.storage import checkpoint_name
from pipelines.training.loop import ModelShape, build_model

pytestmark = pytest.mark.slow

# A warmed-up step schedule: each worker's optimizer follows its own step count, and the
# restarted and resumed runs' restored optimizers go on with it where the checkpoint left it
# (a step schedule, not cosine: the resumed run trains more epochs than the first planned).
EQUIVALENCE = {"optim.epochs": 8, "optim.steps_per_epoch": 2, "data.batch_size": 32,
               "model.depth": 2, "model.width": 32, "optim.schedule": "step", "optim.lr_step_epochs": 3,
               "optim.lr_gamma": 0.5, "optim.warmup_epochs": 1,
               # watched, never stopping: the watcher's state rides every checkpoint, the restart's too
               "optim.early_stopping.metric": "val_loss", "optim.early_stopping.patience": 100,
               "optim.accumulate": 2}  # two batches a step: DDP synchronises on the second only


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    pytest.importorskip("moto")
    with moto_bucket(tmp_path_factory.mktemp("moto")) as made:
        yield made


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, bucket):
    """`local` and the same run under `allreduce` (2 workers) in one store, the allreduce
    one keeping its checkpoints on the bucket and losing a worker (SIGKILL) once its second
    checkpoint is there. (The same allreduce training twice giving the same bits is in
    test_families_allreduce.py, inside one worker group: a second group would cost 15 s
    for the same check.)"""
    root = tmp_path_factory.mktemp("allreduce")
    common = {**EQUIVALENCE, "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
              "resources.storage_path": bucket[0]}
    local = pipelines.train(small_run(**{**common, "resources.storage_path": str(root / "raydeep_runs")}))
    training = TrainingInBackground(small_run(**common, **{
        "strategy.name": "allreduce", "resources.workers": 2, "tracking.run_name": "first"}))
    # The second checkpoint's directory proves the first one was committed: ranks report in step.
    training.wait_for_checkpoint(root, 1, bucket=bucket)
    pids = live_actor_pids(ray_session, class_name="RayTrainWorker")
    assert pids, "no live Ray Train worker to kill"
    # A Ray this process started ends with it: Ray Train's placement-group cleaner would
    # guard nothing, and is not started (one process less before the first step).
    assert not live_actor_pids(ray_session, class_name="PlacementGroupCleaner")
    # In-memory data gives Ray Train no dataset: no DatasetManager actor was started for it.
    assert not live_actor_pids(ray_session, class_name="DatasetManager")
    os.kill(pids[-1], signal.SIGKILL)
    return common, local, training.result()


def test_allreduce_equals_local(runs):
    common, local, first = runs
    # both tested the weights of the same best epoch (the watcher ran in every rank)
    assert first.metrics["best_epoch"] == local.metrics["best_epoch"] and first.metrics["stopped_early"] == 0
    reference, trained = local.model.state_dict(), first.model.state_dict()
    assert reference.keys() == trained.keys()
    initial = build_model(small_run(**EQUIVALENCE), ModelShape((1, 8, 8), 10)).state_dict()
    moved = False
    for key in reference:
        # Each step's gradient is the mean over the same 32 examples, summed in another order
        # (two shards of 16, then DDP's average): float32 sums of n terms differ by at most
        # 2 gamma_n (gamma_n = n u / (1 - n u), u = 2**-24; 4e-6 for n = 32) of the sum of
        # magnitudes. Over 16 steps with momentum 0.9 (which adds up to 10 steps' worth of
        # each error) that is at most 16 * 10 * 4e-6 = 6.4e-4 of an update, and the updates
        # are a small part of each weight: 1e-4 of the weight plus 1e-5 covers it. The
        # restart replays the epochs after the newest checkpoint from its saved state and
        # the same batches: it adds no error of its own.
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-4, atol=1e-5)
        moved |= not torch.allclose(reference[key], initial[key])
    assert moved, "training did not change the weights: the comparison would prove nothing"
    for a, b in zip(local.history, first.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    # It did lose a worker, and restarted from a checkpoint, not from the start.
    assert first.metrics["worker_restarts"] >= 1
    client = MlflowClient(common["tracking.uri"])
    starts = [m.value for m in client.get_metric_history(first.run_id, "worker_group_start_epoch")]
    assert starts[0] == 0 and max(starts) >= 1, f"restart did not resume from a checkpoint: {starts}"
    assert client.get_run(first.run_id).info.status == "FINISHED"
    epochs = EQUIVALENCE["optim.epochs"]
    assert {m.step for m in client.get_metric_history(first.run_id, "train_loss")} == set(range(epochs))


def test_allreduce_keeps_its_newest_checkpoints_on_the_bucket(runs, bucket):
    """Ray Train's workers wrote the checkpoints to the bucket, the newest two
    (`resources.keep_checkpoints`) beside the run's marker, and the ones in between are gone."""
    common, _, first = runs
    names = bucket_listing(bucket[1], "runs/raydeep/first")
    last = EQUIVALENCE["optim.epochs"] - 1
    assert {checkpoint_name(last - 1), checkpoint_name(last), "raydeep_run.json"} <= set(names), names
    assert checkpoint_name(last - 2) not in names, names
    # Not asserted: the checkpoints written before the worker was killed (epochs 0 and 1
    # here) stay on the bucket after the restarted group has written newer ones.


def test_resume_continues_an_allreduce_run_from_its_checkpoint(runs, bucket, tmp_path):
    common, _, first = runs
    store = common["tracking.uri"]
    more = {**common, "optim.epochs": EQUIVALENCE["optim.epochs"] + 1}
    resumed = pipelines.train(small_run(**more, **{"strategy.name": "allreduce", "resume": "first"}))
    assert resumed.run_id == first.run_id
    client = MlflowClient(store)
    steps = {m.step for m in client.get_metric_history(first.run_id, "train_loss")}
    assert steps == set(range(EQUIVALENCE["optim.epochs"] + 1))
    starts = [m.value for m in client.get_metric_history(first.run_id, "worker_group_start_epoch")]
    assert max(starts) == EQUIVALENCE["optim.epochs"]  # the resumed group started after the last epoch
    names = bucket_listing(bucket[1], "runs/raydeep/first")
    assert checkpoint_name(EQUIVALENCE["optim.epochs"]) in names, names  # written on the bucket too
    reference = pipelines.train(small_run(**{**more, "resources.storage_path": str(tmp_path / "raydeep_runs")}))
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)

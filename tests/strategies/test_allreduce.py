"""Tier 2/3: allreduce on a real local Ray (Ray Train, DDP over gloo) against the reference.

A Ray Train worker group takes about 14 s to start here, so each run below checks several
things: the allreduce run that equals the reference is then resumed, and the CNN that must
reach 0.98 also loses a worker on the way.
"""
import os
import signal

import pytest
import torch
from helpers import TrainingInBackground, live_actor_pids, small_run
from mlflow.tracking import MlflowClient

import pipelines
import pipelines.training.loop

pytestmark = pytest.mark.slow

EQUIVALENCE = {"optim.epochs": 2, "optim.steps_per_epoch": 6, "data.batch_size": 32,
               "model.depth": 2, "model.width": 32}


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """`local` and the same run under `allreduce` (2 workers), in one store. (The same
    allreduce training twice giving the same bits is in test_families_allreduce.py, inside
    one worker group: a second group would cost 15 s for the same check.)"""
    root = tmp_path_factory.mktemp("allreduce")
    common = {**EQUIVALENCE, "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
              "resources.storage_path": str(root / "raydeep_runs")}
    local = pipelines.train(small_run(**common))
    first = pipelines.train(small_run(**common, **{
        "strategy.name": "allreduce", "resources.workers": 2, "tracking.run_name": "first"}))
    return common, local, first


def test_allreduce_equals_local(runs):
    common, local, first = runs
    reference, trained = local.model.state_dict(), first.model.state_dict()
    assert reference.keys() == trained.keys()
    initial = pipelines.training.loop.build_model(small_run(**EQUIVALENCE), (1, 8, 8), 10).state_dict()
    moved = False
    for key in reference:
        # Each step's gradient is the mean over the same 32 examples, summed in another order
        # (two shards of 16, then DDP's average): float32 sums of n terms differ by at most
        # 2 gamma_n (gamma_n = n u / (1 - n u), u = 2**-24; 4e-6 for n = 32) of the sum of
        # magnitudes. Over 12 steps with momentum 0.9 (which adds up to 10 steps' worth of
        # each error) that is at most 12 * 10 * 4e-6 = 5e-4 of an update, and the updates
        # are a small part of each weight: 1e-4 of the weight plus 1e-5 covers it.
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-4, atol=1e-5)
        moved |= not torch.allclose(reference[key], initial[key])
    assert moved, "training did not change the weights: the comparison would prove nothing"
    for a, b in zip(local.history, first.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_resume_continues_an_allreduce_run_from_its_checkpoint(runs):
    common, _, first = runs
    store = common["tracking.uri"]
    three = {**common, "optim.epochs": 3}
    resumed = pipelines.train(small_run(**three, **{"strategy.name": "allreduce", "resume": "first"}))
    assert resumed.run_id == first.run_id
    client = MlflowClient(store)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train_loss")) == [0, 1, 2]
    starts = [m.value for m in client.get_metric_history(first.run_id, "worker_group_start_epoch")]
    assert sorted(starts) == [0, 2]
    reference = pipelines.train(small_run(**three))
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_cnn_reaches_098_under_allreduce_after_losing_a_worker(ray_session, store, workdir):
    cfg = small_run(**{"tracking.uri": store, "strategy.name": "allreduce", "model.name": "cnn",
                       "optim.epochs": 10, "tracking.run_name": "ft"})
    training = TrainingInBackground(cfg)
    # The second checkpoint's directory proves the first one was committed: ranks report in step.
    training.wait_for_checkpoint(workdir, 1)
    pids = live_actor_pids(ray_session, class_name="RayTrainWorker")
    assert pids, "no live Ray Train worker to kill"
    os.kill(pids[-1], signal.SIGKILL)
    result = training.result()
    assert result.metrics["worker_restarts"] >= 1
    client = MlflowClient(store)
    starts = [m.value for m in client.get_metric_history(result.run_id, "worker_group_start_epoch")]
    assert starts[0] == 0 and max(starts) >= 1, f"restart did not resume from a checkpoint: {starts}"
    assert client.get_run(result.run_id).info.status == "FINISHED"
    epochs = {m.step for m in client.get_metric_history(result.run_id, "train_loss")}
    assert epochs == set(range(10))
    assert result.metrics["test_accuracy"] >= 0.98

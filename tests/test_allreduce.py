"""Tier 2/3: allreduce on a real local Ray (Ray Train, DDP over gloo) against the reference."""
import os
import signal

import pytest
import torch
from mlflow.tracking import MlflowClient

import pipelines
from conftest import TrainingInBackground, live_actor_pids, small_run

pytestmark = pytest.mark.slow


def test_allreduce_equals_local_on_the_same_global_batches(ray_session, store):
    common = {"tracking.uri": store, "optim.epochs": 2, "optim.steps_per_epoch": 6,
              "data.batch_size": 32, "model.depth": 2, "model.width": 32}
    local = pipelines.train(small_run(**common))
    distributed = pipelines.train(small_run(**common, **{"strategy.name": "allreduce",
                                                         "resources.workers": 2}))
    reference, trained = local.model.state_dict(), distributed.model.state_dict()
    assert reference.keys() == trained.keys()
    moved = False
    initial = pipelines.strategy.build_model(small_run(**common), (1, 8, 8), 10).state_dict()
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-4, atol=1e-5)
        moved |= not torch.allclose(reference[key], initial[key])
    assert moved, "training did not change the weights: the comparison would prove nothing"
    for a, b in zip(local.history, distributed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_cnn_reaches_098_under_allreduce(ray_session, store):
    result = pipelines.train(small_run(**{"tracking.uri": store, "strategy.name": "allreduce",
                                          "model.name": "cnn", "optim.epochs": 10}))
    assert result.metrics["test_accuracy"] >= 0.98
    assert MlflowClient(store).get_run(result.run_id).info.status == "FINISHED"


def test_killed_worker_restarts_from_checkpoint_and_finishes(ray_session, store, workdir):
    cfg = small_run(**{
        "tracking.uri": store, "strategy.name": "allreduce", "tracking.run_name": "ft",
        "data.source": "synthetic", "data.synthetic_samples": 40000, "data.synthetic_shape": [64],
        "optim.epochs": 6, "model.width": 256})
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
    assert epochs == set(range(6))
    assert result.metrics["test_accuracy"] > 0.9


def test_resume_continues_an_allreduce_run_from_its_checkpoint(ray_session, store):
    common = {"tracking.uri": store, "strategy.name": "allreduce", "optim.steps_per_epoch": 4}
    first = pipelines.train(small_run(**common, **{"tracking.run_name": "again", "optim.epochs": 2}))
    resumed = pipelines.train(small_run(**common, **{"resume": "again", "optim.epochs": 3}))
    assert resumed.run_id == first.run_id
    client = MlflowClient(store)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train_loss")) == [0, 1, 2]
    starts = [m.value for m in client.get_metric_history(first.run_id, "worker_group_start_epoch")]
    assert sorted(starts) == [0, 2]
    reference = pipelines.train(small_run(**{"tracking.uri": store, "optim.steps_per_epoch": 4,
                                            "optim.epochs": 3}))
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)

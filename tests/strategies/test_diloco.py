"""`diloco` on a real local Ray: H local steps per synchronisation, an outer optimizer on
the driver, a worker lost mid-round left out of that round and replaced."""
from pathlib import Path

import pytest
import torch
from helpers import run_cli, small_run, train_and_kill
from mlflow.tracking import MlflowClient

import pipelines

pytestmark = pytest.mark.slow

PLAIN_SGD = {"optim.epochs": 2, "optim.steps_per_epoch": 4, "data.batch_size": 32, "model.depth": 2,
             "model.width": 32, "optim.momentum": 0.0, "optim.lr": 0.1,
             "optim.schedule": "step", "optim.lr_gamma": 0.5}  # each worker's inner steps follow it


def test_one_step_rounds_of_plain_averaging_take_locals_steps(ray_session, store):
    # Early stopping that no improvement can satisfy (min_delta): every run stops after epoch
    # 2 of 3 and is tested with epoch 1's weights, which the comparisons below hold equal.
    common = {**PLAIN_SGD, "tracking.uri": store, "optim.epochs": 3, "optim.early_stopping.metric": "val_loss",
              "optim.early_stopping.patience": 1, "optim.early_stopping.min_delta": 1e9}
    local = pipelines.train(small_run(**common))
    losses = [h["train_loss"] for h in local.history]
    assert losses[1] < losses[0], losses  # the weights moved: the comparison proves something
    averaged = pipelines.train(small_run(**common, **{
        "strategy.name": "diloco", "resources.workers": 2, "strategy.sync_every": 1,
        "strategy.outer_lr": 1.0, "strategy.outer_momentum": 0.0}))
    for key, value in local.model.state_dict().items():
        # Per step each weight goes theta - (theta - (theta - lr g_w)) through the workers'
        # and the driver's float32 roundings (a few u = 6e-8 of the weight), and the mean of
        # two halves' gradients is another summation order of the batch's (2 gamma_16 of
        # the sum of magnitudes, times lr): over 8 steps well under 1e-5 of each weight.
        torch.testing.assert_close(averaged.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert averaged.metrics["stopped_early"] == local.metrics["stopped_early"] == 1
    assert averaged.metrics["best_epoch"] == 1 and len(averaged.history) == 2
    numel = averaged.metrics["num_params"]
    assert [h["syncs"] for h in averaged.history] == [4, 4]
    assert [h["bytes_sent_per_worker"] for h in averaged.history] == [4 * numel * 4] * 2
    assert averaged.metrics["bytes_saved_vs_allreduce"] == 1.0  # 2 workers: ring allreduce sends 1 gradient
    # Rounds of 8 steps in bfloat16 over epochs of 4 span two epochs: 3 epochs are cut into
    # rounds of 2 and 1 (no short last round of a fraction of an epoch). The epoch inside a
    # round is logged with its training figures only, and is not checkpointed: 2 bytes a
    # parameter twice in 12 steps, against 4 bytes in every step.
    spanning = {**PLAIN_SGD, "tracking.uri": store, "optim.epochs": 3, "tracking.run_name": "spanning"}
    compressed = pipelines.train(small_run(**spanning, **{
        "strategy.name": "diloco", "resources.workers": 2, "strategy.sync_every": 8,
        "strategy.push_dtype": "bfloat16"}))
    assert [h["syncs"] for h in compressed.history] == [0, 1, 1]
    assert [h["bytes_sent_per_worker"] for h in compressed.history] == [0, numel * 2, numel * 2]
    assert "val_loss" not in compressed.history[0] and "val_loss" in compressed.history[1]
    assert [h["train_loss"] for h in compressed.history][2] < compressed.history[0]["train_loss"]
    assert compressed.metrics["bytes_saved_vs_allreduce"] == 12.0
    saved = sorted(p.name for p in compressed.run_dir.glob("checkpoint_epoch_*"))
    assert saved == ["checkpoint_epoch_00001", "checkpoint_epoch_00002"], saved


def test_mlp_and_cnn_meet_their_bars_syncing_every_16_steps_and_a_killed_worker_is_replaced(
        ray_session, workdir, store):
    done = run_cli("run", "--strategy", "diloco", "--workers", "2", "--sync-every", "16", "--outer-lr", "0.7",
                   "--outer-momentum", "0.5", "--run-name", "mlp", "--link-mbps", "1000", "--tracking-uri", store, "--set",
                   "tracking.log_model=false", "--set", "tracking.figures=false", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(store)
    (mlp,) = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id],
                                filter_string="attributes.run_name = 'mlp'")
    # Synchronous rounds, summed in rank order: the run is deterministic, and its bars are
    # allreduce's (the main job's 0.97 for the MLP; the CNN's 0.98 under pipeline).
    assert mlp.info.status == "FINISHED" and mlp.data.metrics["test_accuracy"] >= 0.97
    assert mlp.data.metrics["bytes_saved_vs_allreduce"] >= 8  # 20 steps an epoch in 2 rounds: 10x
    # --link-mbps: each pseudo-gradient waited its time over a 1 Gbit/s link before it left
    sent = mlp.data.metrics["bytes_sent_per_worker_total"]
    assert mlp.data.metrics["link_wait_s_per_worker"] == pytest.approx(sent * 8 / 1e9, rel=1e-9)
    cnn = pipelines.train(small_run(**{"tracking.uri": store, "model.name": "cnn", "optim.epochs": 10,
                                       "strategy.name": "diloco", "resources.workers": 2,
                                       "strategy.sync_every": 16}))
    assert cnn.metrics["test_accuracy"] >= 0.98
    # A worker killed once the second epoch is saved: its round is left out, a new worker
    # joins the next. Which round it dies in depends on timing: the bar is the MLP's less two
    # binomial standard errors on 360 test digits (0.008 each at 0.975).
    killed = train_and_kill(small_run(**{"tracking.uri": store, "tracking.run_name": "killed", "optim.epochs": 10,
                                         "strategy.name": "diloco", "resources.workers": 2,
                                         "strategy.sync_every": 16}), ray_session, workdir, "worker-1")
    assert killed.metrics["worker_restarts"] == 1 and killed.metrics["test_accuracy"] >= 0.96
    assert client.get_run(killed.run_id).info.status == "FINISHED"
    assert (Path(workdir) / "raydeep_runs" / "killed" / "checkpoint_epoch_00009").is_dir()

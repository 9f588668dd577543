"""The `lbfgs` strategy on a real local Ray: iterates against torch.optim.LBFGS, accuracy,
a worker killed mid-run, one-line errors, the command line."""
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import pipelines
from conftest import run_cli, small_run, train_and_kill
from pipelines import data as datasets
from pipelines.lbfgs import Sandblaster, stochastic_loss
from pipelines.lbfgs_worker import portion_bounds
from pipelines.ps_layout import flat_parameters
from pipelines.strategy import build_model
from pipelines.tracking import Tracker

pytestmark = pytest.mark.slow

TINY = {"model.width": 16, "model.depth": 1, "tracking.log_model": False}

MLP_TO_097 = {"model.width": 64, "model.depth": 1, "model.activation": "tanh",
              "optim.weight_decay": 3e-4, "optim.epochs": 5, "strategy.iterations_per_epoch": 20}
"""Full-batch L-BFGS drives the MLP's training loss to 0 within 100 iterations and then
overfits (torch.optim.LBFGS alone: 0.95-0.975 on the splits of seeds 0-2); the objective's
L2 term (optim.weight_decay) holds it at 0.981 / 0.983 / 0.978 after 100 iterations on
seeds 0 / 1 / 2 in torch, and a width-64 tanh layer keeps it quick."""


def lbfgs_run(store, **overrides):
    base = {"tracking.uri": store, "strategy.name": "lbfgs", "resources.workers": 2, **TINY}
    return small_run(**{**base, **overrides})


def raydeep_iterates(run, store, workdir, iterations):
    """x after each iteration of one epoch of `iterations` iterations."""
    data = datasets.load(run.data, run.seed)
    tracker = Tracker.start(store, "lbfgs-iterates", "iterates", {})
    driver = Sandblaster(run, data, tracker, workdir / "iterates")
    seen = []
    try:
        driver.lbfgs.epoch(0, lambda it: seen.append(driver.lbfgs.shards.gather("x")))
    finally:
        driver.close()
    assert len(seen) == iterations
    return seen


def torch_iterates(run, iterations, portions=1):
    """torch.optim.LBFGS's x after each of `iterations` steps of one iteration each, its
    objective the mean loss over the training split summed over `portions` portions in
    order (one portion: the plain full-batch mean)."""
    data = datasets.load(run.data, run.seed)
    model = build_model(run, data.input_shape, data.num_classes).train()
    o = run.strategy.params
    optimizer = torch.optim.LBFGS(model.parameters(), lr=o.lr, max_iter=1, max_eval=o.max_evals_per_epoch,
                                  tolerance_grad=o.tolerance_grad, tolerance_change=o.tolerance_change,
                                  history_size=o.history, line_search_fn="strong_wolfe")
    n = len(data.y_train)

    def closure():
        optimizer.zero_grad()
        total = None
        for start, stop in portion_bounds(n, portions):  # backward per portion: .grad sums in order
            loss = model.loss((data.x_train[start:stop], data.y_train[start:stop]))
            loss = loss * ((stop - start) / n) if portions > 1 else loss
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    seen = []
    for _ in range(iterations):
        optimizer.step(closure)
        seen.append(flat_parameters(model).clone())
    return seen


# A budget of evaluations no iteration's line search reaches, so that one epoch of 10
# iterations and torch's 10 steps of one iteration each take the very same steps.
TEN = {"strategy.iterations_per_epoch": 10, "strategy.max_evals_per_epoch": 250}


def test_one_worker_one_shard_takes_torchs_steps_exactly(ray_session, store, workdir):
    run = lbfgs_run(store, **TEN, **{"resources.workers": 1, "strategy.shards": 1,
                                     "strategy.portions": 1})
    ours, reference = raydeep_iterates(run, store, workdir, 10), torch_iterates(run, 10)
    assert not torch.equal(reference[-1], reference[0]), "the iterates did not move"
    for k, (x, x_torch) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(x, x_torch, rtol=0, atol=0, msg=lambda m: f"iteration {k + 1}: {m}")


def test_two_workers_two_shards_take_torchs_steps(ray_session, store, workdir):
    run = lbfgs_run(store, **TEN, **{"strategy.shards": 2})
    portions = run.strategy.params.portions_for(run)
    assert portions == 8
    ours = raydeep_iterates(run, store, workdir, 10)
    # The same objective torch computes, summed over the 8 portions as the shards sum it:
    # only the dot products differ, each summed over two shards.
    for k, (x, x_torch) in enumerate(zip(ours, torch_iterates(run, 10, portions))):
        torch.testing.assert_close(x, x_torch, msg=lambda m: f"iteration {k + 1}: {m}")
    # Against the one-piece full-batch mean, the loss and gradient differ in their last bit
    # and the line search's cubic interpolation (differences of nearby losses) amplifies
    # that: measured 2e-5 at most over these 10 iterations.
    for k, (x, x_torch) in enumerate(zip(ours, torch_iterates(run, 10))):
        torch.testing.assert_close(x, x_torch, rtol=1e-4, atol=1e-4, msg=lambda m: f"iteration {k + 1}: {m}")


def test_mlp_reaches_097_on_digits_and_logs_every_iteration(ray_session, store):
    result = pipelines.train(lbfgs_run(store, **MLP_TO_097))
    assert result.metrics["test_accuracy"] >= 0.97
    assert result.metrics["iterations"] == 100
    client = MlflowClient(store)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 100 and losses[-1] < losses[0] / 10
    for key in ("grad_norm", "step_size", "line_search_evals", "samples_per_s"):
        assert len(client.get_metric_history(result.run_id, key)) == 100, key
    for key in ("train_loss", "val_accuracy"):
        assert len(client.get_metric_history(result.run_id, key)) == 5, key


def test_killed_worker_portions_rerun_with_the_same_result(ray_session, store, workdir):
    common = {"optim.epochs": 5, "strategy.iterations_per_epoch": 6}
    killed = train_and_kill(lbfgs_run(store, **common, **{"tracking.run_name": "kill"}),
                            ray_session, workdir, "worker-1")
    assert killed.metrics["worker_restarts"] == 1
    # Whether a portion was in flight at the kill (and so re-run) depends on timing; the
    # result may not depend on it.
    unkilled = pipelines.train(lbfgs_run(store, **common, **{"tracking.run_name": "no-kill"}))
    assert unkilled.metrics["worker_restarts"] == unkilled.metrics["rerun_portions"] == 0
    assert killed.metrics["iterations"] == unkilled.metrics["iterations"] >= 20
    assert killed.metrics["function_evaluations"] == unkilled.metrics["function_evaluations"]
    # Portions are summed in portion order whichever worker answered: the very same bits.
    for key, value in unkilled.model.state_dict().items():
        torch.testing.assert_close(killed.model.state_dict()[key], value, rtol=0, atol=0)


def test_stochastic_losses_are_found_without_naming_the_model():
    digits = datasets.load(small_run().data)
    batch = (digits.x_train[:32], digits.y_train[:32])
    build = lambda **params: build_model(small_run(**params), (1, 8, 8), 10)  # noqa: E731
    assert stochastic_loss(build(), batch) is None
    assert "dropout" in stochastic_loss(build(**{"model.dropout": 0.2}), batch)
    vae = build(**{"model.name": "vae"})
    assert not any(isinstance(m, nn.Dropout) for m in vae.modules())
    assert "two evaluations" in stochastic_loss(vae, batch)  # its sampled z, found by evaluating


def test_portions_are_contiguous_and_differ_by_at_most_one_example():
    assert portion_bounds(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert portion_bounds(7, 1) == [(0, 7)]


@pytest.mark.parametrize("flags, message", [
    (["--ps-shards", "0"], "strategy.shards must be >= 1, got 0"),
    (["--set", "strategy.history=0"], "strategy.history must be >= 1, got 0"),
    (["--workers", "4", "--set", "strategy.portions=2"],
     "strategy.portions (2) must be >= resources.workers (4)"),
    (["--set", "model.dropout=0.2"], "model mlp has a stochastic loss (2 dropout layers with p=0.2)"),
])
def test_bad_lbfgs_options_are_one_line_errors(workdir, flags, message):
    done = run_cli("run", "--strategy", "lbfgs", *flags, cwd=workdir, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydeep: error:") and message in lines[0], done.stderr
    assert not (workdir / "raydeep_runs").exists()


def test_lbfgs_run_from_the_command_line(workdir):
    done = run_cli("run", "--strategy", "lbfgs", "--workers", "2", "--ps-shards", "2", "--epochs", "1",
                   "--num-cpus", "4", "--run-name", "cli", "--set", "tracking.log_model=false",
                   "--set", "strategy.iterations_per_epoch=5", "--set", "model.width=32", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1/1" in done.stdout
    client = MlflowClient(f"sqlite:///{Path(workdir) / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["raydeep.strategy"] == "lbfgs"
    iterations = run.data.metrics["iterations"]  # at most 5; fewer once 6 evaluations are spent
    assert 1 <= iterations <= 5 and "test_accuracy" in run.data.metrics
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == iterations and losses[-1] < losses[0]
    assert (workdir / "raydeep_runs" / "cli" / "checkpoint_epoch_00000").is_dir()

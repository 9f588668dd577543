"""Tier 2 without Ray: the local reference loop and what a run leaves in MLflow."""
import mlflow
import mlflow.pytorch
import pytest
import torch
from helpers import run_cli, small_run
from mlflow.tracking import MlflowClient

import models
import pipelines
import pipelines.run
from models.mlp import MLP, MLPConfig
from models.registry import ModelSpec


def test_local_run_is_recorded_in_mlflow(store):
    result = pipelines.train(small_run(**{"tracking.uri": store, "tracking.log_model": True,
                                          "tracking.figures": True, "optim.epochs": 3, "optim.lr": 0.1}))
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mlp" and run.data.params["optim.lr"] == "0.1"
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_s", "test_loss", "test_accuracy"):
        assert key in run.data.metrics, key
    assert len(MlflowClient(store).get_metric_history(result.run_id, "train_loss")) == 3
    assert result.metrics["test_accuracy"] > 0.9
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(result.run_id)}
    assert {"loss_curve.png", "confusion_matrix.png"} <= artifacts
    mlflow.set_tracking_uri(store)
    loaded = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), result.model(x))


def test_same_seed_same_run(store, monkeypatch):
    # Default names are timestamps to the second: both runs are given the same one here, as
    # two runs started in one second are, and the second is NAME-2, not refused.
    monkeypatch.setattr(pipelines.run, "timestamped", lambda prefix: f"{prefix}-20261202-120000")
    a = pipelines.train(small_run(**{"tracking.uri": store}))
    b = pipelines.train(small_run(**{"tracking.uri": store}))
    assert (a.run_name, b.run_name) == ("mlp-local-20261202-120000", "mlp-local-20261202-120000-2")
    for key, value in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[key], value), key
    timing = ("samples_per_s", "time_to_first_step_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in a.history] == \
           [{k: v for k, v in h.items() if k not in timing} for h in b.history]


def test_resume_continues_the_same_mlflow_run(store):
    first = pipelines.train(small_run(**{"tracking.uri": store, "tracking.run_name": "r1"}))
    again = pipelines.train(small_run(**{"tracking.uri": store, "optim.epochs": 4, "resume": "r1"}))
    assert again.run_id == first.run_id
    steps = [m.step for m in MlflowClient(store).get_metric_history(first.run_id, "train_loss")]
    assert sorted(steps) == [0, 1, 2, 3]
    straight = pipelines.train(small_run(**{"tracking.uri": store, "optim.epochs": 4}))
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value)


def test_resume_takes_the_runs_own_config_and_refuses_another(workdir, store):
    """`raydeep run --resume` continues what the run trained (a CNN here, though the
    command names no model), takes a new epoch count and says so, and refuses in one line
    to continue it as something else, before anything trains."""
    first = run_cli("run", "--model", "cnn", "--strategy", "local", "--epochs", "1", "--run-name", "c",
                    "--set", "tracking.log_model=false", cwd=workdir)
    assert first.returncode == 0, first.stderr
    again = run_cli("run", "--resume", "--epochs", "2", "--set", "tracking.log_model=false", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "resuming c: optim.epochs is now 2 (it was 1)" in again.stdout
    (run,) = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("raydeep").experiment_id])
    assert run.data.params["model.name"] == "cnn"
    assert sorted(m.step for m in MlflowClient(store).get_metric_history(run.info.run_id, "train_loss")) == [0, 1]
    for flags, key in ((["--model", "mlp"], "model.name"), (["--lr", "0.5"], "optim.lr"),
                       (["--strategy", "ps"], "strategy.name"), (["--seed", "3"], "seed")):
        refused = run_cli("run", "--resume", "c", *flags, cwd=workdir)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and f"trained with {key}=" in lines[0], refused.stderr
    with pytest.raises(pipelines.ConfigError, match="trained with model.name=cnn"):
        pipelines.train(small_run(**{"tracking.uri": store, "resume": "c", "optim.epochs": 3}))


class _Exploding(MLP):
    def loss(self, batch):
        raise RuntimeError("exploded on purpose")


def test_a_failing_run_is_marked_failed(store):
    if "exploding" not in models.names():
        models.register(ModelSpec("exploding", MLPConfig, _Exploding))
    with pytest.raises(pipelines.RunFailed) as failure:
        pipelines.train(small_run(**{"tracking.uri": store, "model.name": "exploding"}))
    run = MlflowClient(store).get_run(failure.value.run_id)
    assert run.info.status == "FAILED"
    assert "exploded on purpose" in run.data.tags["error"]


def test_grad_norms_show_vanishing_gradients_of_a_deep_sigmoid_mlp(store):
    def layer_norms(activation, figures):
        result = pipelines.train(small_run(**{
            "tracking.uri": store, "tracking.grad_norms": True, "optim.epochs": 1,
            "tracking.figures": figures,
            "model.depth": 6, "model.width": 64, "model.activation": activation}))
        norms = {k: v for k, v in result.history[-1].items() if k.startswith("grad_norm.")}
        names = sorted(norms, key=lambda k: int(k.split(".")[-1]))
        return result, norms[names[0]], norms[names[-1]]

    sigmoid, first, last = layer_norms("sigmoid", figures=True)
    assert first < last / 20, (first, last)
    relu, relu_first, relu_last = layer_norms("relu", figures=False)
    assert relu_first / relu_last > 10 * first / last
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(sigmoid.run_id)}
    assert {"grad_norms.png", "first_layer_filters.png"} <= artifacts
    # tracking.figures false: the run draws nothing
    assert not [a.path for a in MlflowClient(store).list_artifacts(relu.run_id) if a.path.endswith(".png")]
    assert MlflowClient(store).get_run(sigmoid.run_id).data.metrics["num_params"] == sum(
        p.numel() for p in sigmoid.model.parameters())


BRANCHY = '''
import math

from torch import nn


class Branchy(nn.Module):
    """A forward that branches on its data: torch.export cannot trace it."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.a = nn.Linear(math.prod(input_shape), 16)
        self.b = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.b(h.relu() if h.mean() > 0 else h.tanh())
'''


@pytest.mark.slow  # a fresh process imports torch and MLflow
def test_a_users_module_that_cannot_be_exported_is_logged_pickled_with_its_code(tmp_path):
    """The Python API's model= takes the class; MLflow cannot export this one, so it is
    pickled with the user's file beside it and loads in a fresh process elsewhere."""
    import json
    import subprocess
    import sys

    code = tmp_path / "project"
    code.mkdir()
    (code / "branchy_user.py").write_text(BRANCHY)
    sys.path.append(str(code))
    try:
        import branchy_user

        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        result = pipelines.train(small_run(**{"tracking.uri": store, "tracking.log_model": True,
                                              "resources.storage_path": str(tmp_path / "runs")}),
                                 model=branchy_user.Branchy)
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("branchy_user", None)
    run = MlflowClient(store).get_run(result.run_id)
    assert run.data.tags["raydeep.model_class_path"] == "branchy_user:Branchy"
    assert run.data.params["model.class_path"] == "branchy_user:Branchy"
    assert result.metrics["test_accuracy"] > 0.5
    x = torch.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)
    script = ("import json, mlflow, mlflow.pytorch, torch\n"
              f"mlflow.set_tracking_uri({store!r})\n"
              f"model = mlflow.pytorch.load_model('runs:/{result.run_id}/model')\n"
              "x = torch.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)\n"
              "print(json.dumps([type(model).__module__, model(x).tolist()]))\n")
    elsewhere = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    module, outputs = json.loads(elsewhere.stdout.strip().splitlines()[-1])
    assert module == "branchy_user"  # the user's class itself, from the code logged beside it
    with torch.no_grad():  # the same weights; only thread counts may reorder a sum (64 terms)
        torch.testing.assert_close(torch.tensor(outputs), result.model(x), rtol=1e-5, atol=1e-5)


def test_early_stopping_ends_the_run_and_tests_the_best_epochs_weights(workdir, store):
    """At lr 0.3 the MLP's validation loss dips, then climbs for two epochs: the run stops
    there, says why, and its test metrics and logged model are the best epoch's."""
    from pipelines.storage import Store
    from pipelines.training.early_stopping import STATE_KEY

    done = run_cli("run", "--strategy", "local", "--lr", "0.3", "--epochs", "10", "--tracking-uri", store,
                   "--run-name", "stops", "--set", "optim.early_stopping.metric=val_loss",
                   "--set", "optim.early_stopping.patience=2", "--set", "tracking.figures=false", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped early: val_loss has not improved by more than 0 for 2 epoch(s) since epoch" in done.stdout
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id],
                             "attributes.run_name = 'stops'")[0]
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)]
    best = int(run.data.metrics["best_epoch"])
    assert run.data.metrics["stopped_early"] == 1.0 and len(losses) == best + 2 < 10
    assert losses[best - 1] == min(losses) and run.data.tags["raydeep.stopped_early"].startswith("stopped early")
    # the last checkpoint holds the best epoch's weights beside its own; the run tested those
    runs = Store(str(workdir / "raydeep_runs"))
    last = runs.reopen(runs.find("stops")).newest_state()
    kept = last["extra"][STATE_KEY]["model"]
    assert any(not torch.equal(kept[k], last["model"][k]) for k in kept)
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = torch.rand(5, 1, 8, 8)
    reference = models.get("mlp").build(MLPConfig(), (1, 8, 8), 10)
    reference.load_state_dict(kept)
    torch.testing.assert_close(logged(x), reference.eval()(x))


def test_bf16_autocast_trains_the_mlp_as_fp32_does(store):
    """The same run in bf16 autocast (weights, gradients and SGD's state stay float32) ends
    within two standard errors of fp32's test accuracy: a difference of two accuracies on
    360 digits has at most sqrt(2) times one's binomial error (0.0095 at 0.97), so 0.027.
    Measured 0.975 and 0.975 at 10 epochs; 0.9667 and 0.9500 at 8 (benchmarks/precision.py)."""
    common = {"tracking.uri": store, "optim.epochs": 6, "optim.lr": 0.1}
    fp32 = pipelines.train(small_run(**common))
    bf16 = pipelines.train(small_run(**common, **{"optim.precision": "bf16"}))
    a, b = fp32.metrics["test_accuracy"], bf16.metrics["test_accuracy"]
    assert b >= a - 2 * 2 ** 0.5 * (a * (1 - a) / 360) ** 0.5, (a, b)
    assert fp32.metrics["test_loss"] != bf16.metrics["test_loss"]  # autocast did change the arithmetic

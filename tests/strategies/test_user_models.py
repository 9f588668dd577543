"""A user's own module, in a directory outside the repository, trained from the command line
under every strategy on the session's Ray (`ps` with a user's module: its `--address`
test in tests/system/test_cluster.py), which was started without the user's code: each
actor and Ray Train worker gets it through its own runtime_env. The module imports a sibling
file of its directory, which must travel too. Its MLflow model then loads in a fresh process
started in another directory.

Sweeps of its init_args are in tests/system/test_sweep.py; `raydeep submit` and `--address`
with a user's module in tests/system/test_cluster.py; bad import paths and init_args in
tests/system/test_bad_input.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import mlflow.pytorch
import pytest
import torch
from helpers import run_cli
from mlflow.tracking import MlflowClient

from pipelines.storage import newest_state

pytestmark = pytest.mark.slow

BLOCKS = '''
from torch import nn


def hidden(n_in: int, width: int) -> list:
    return [nn.Linear(n_in, width), nn.Tanh()]
'''

NET = '''
import math

from torch import nn

from userblocks import hidden


class Net(nn.Module):
    """Nothing but forward: raydeep supplies the loss and the metrics."""

    def __init__(self, input_shape, num_classes, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), *hidden(math.prod(input_shape), width),
                                  nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)


def stack(input_shape, num_classes, width: int = 32) -> nn.Sequential:
    """A factory of an nn.Sequential: the pipeline can cut it."""
    return nn.Sequential(nn.Flatten(), *hidden(math.prod(input_shape), width),
                         nn.Linear(width, width), nn.Tanh(), nn.Linear(width, num_classes))
'''

COMMON = ["--epochs", "1", "--set", "optim.steps_per_epoch=3", "--set", "model.init_args.width=16",
          "--set", "tracking.figures=false", "--set", "optim.lr=0.1", "--set", "tracking.log_model=false"]
RUNS = {
    "local": ["--model", "usernet:Net", "--strategy", "local",
              "--set", "tracking.log_model=true"],  # the one whose model is loaded elsewhere
    "lbfgs": ["--model", "usernet:Net", "--strategy", "lbfgs", "--workers", "2", "--shards", "2"],
    "local-stack": ["--model", "usernet:stack", "--strategy", "local"],
    "pipeline": ["--model", "usernet.stack", "--strategy", "pipeline", "--stages", "2", "--microbatches", "2"],
    # (allreduce: a user's module is submitted to a two-node cluster and trained there in
    # tests/system/test_cluster.py; a Ray Train worker group here would cost 20 s more)
    # one-step rounds, plain averaging: SGD's momentum is linear in the gradients, so each
    # worker's own buffer averages to allreduce's
    "diloco": ["--model", "usernet:Net", "--strategy", "diloco", "--workers", "2", "--sync-every", "1",
               "--outer-lr", "1", "--outer-momentum", "0"],
}


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("users-project")
    (root / "userblocks.py").write_text(BLOCKS)
    (root / "usernet.py").write_text(NET)
    yield root
    for name in ("usernet", "userblocks"):
        sys.modules.pop(name, None)


def test_a_users_module_trains_under_every_strategy_and_its_model_loads_elsewhere(
        ray_session, user_dir, tmp_path):
    store = f"sqlite:///{user_dir / 'mlflow.db'}"
    runs = {}
    for name, args in RUNS.items():
        # The default code directory is the current one, as a user in their project types it.
        done = run_cli("run", *COMMON, *args, "--run-name", name, "--tracking-uri", store, cwd=user_dir)
        assert done.returncode == 0, (name, done.stderr[-3000:], done.stdout[-3000:])
        runs[name] = MlflowClient(store).search_runs(
            [MlflowClient(store).get_experiment_by_name("raydeep").experiment_id],
            filter_string=f"attributes.run_name = '{name}'")[0]
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["raydeep.model_class_path"] == RUNS[name][1], name
        assert run.data.params["model.init_args.width"] == "16", name
        assert "test_accuracy" in run.data.metrics, name

    # The synchronous strategies take local's steps on the same global batches. Bound as in
    # test_allreduce.py's equivalence (16 steps there, 3 here): 1e-4 of a weight plus 1e-5.
    weights = {name: newest_state(str(user_dir / "raydeep_runs" / name))["model"]
               for name in ("local", "pipeline", "local-stack", "diloco")}
    for strategy, reference in (("pipeline", "local-stack"), ("diloco", "local")):
        trained, expected = weights[strategy], weights[reference]
        assert trained.keys() == expected.keys() and len(expected) >= 4
        for key in expected:
            torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-5)

    # A fresh process in a directory that holds none of the user's code. MLflow 3 saved the
    # model as a torch.export program; a module it cannot export is pickled with its code
    # (tests/strategies/test_local.py).
    x = torch.linspace(0, 1, 2 * 64).reshape(2, 1, 8, 8)
    script = ("import json, sys, mlflow, mlflow.pytorch, torch\n"
              f"mlflow.set_tracking_uri({store!r})\n"
              f"model = mlflow.pytorch.load_model('runs:/{runs['local'].info.run_id}/model')\n"
              "x = torch.linspace(0, 1, 2 * 64).reshape(2, 1, 8, 8)\n"
              "print(json.dumps(model(x).tolist()))\n")
    elsewhere = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    outputs = json.loads(elsewhere.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        # The same weights: only the two processes' thread counts may order a product's sums
        # differently, within gamma_64 ~ 4e-6 of the sum of magnitudes (64 inputs per unit).
        mlflow.set_tracking_uri(store)
        here = mlflow.pytorch.load_model(f"runs:/{runs['local'].info.run_id}/model")
        torch.testing.assert_close(torch.tensor(outputs), here(x), rtol=1e-5, atol=1e-5)

    # --resume from another directory: the run's marker recorded where the module was found.
    common = ["--storage-path", str(user_dir / "raydeep_runs"), "--tracking-uri", store]
    resumed = run_cli("run", "--resume", "local", "--epochs", "2", "--set", "tracking.log_model=false",
                      *common, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epoch 2/2" in resumed.stdout and "epoch 1/2" not in resumed.stdout
    other = run_cli("run", "--resume", "local", "--model", "usernet:stack", *common, cwd=tmp_path)
    assert other.returncode == 2 and ("the run was trained with model.name=usernet:Net, this command "
                                      "asks for model.name=usernet:stack") in other.stderr

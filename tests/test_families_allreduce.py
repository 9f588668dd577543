"""Every registered family trains under `allreduce` (DDP over gloo) through the common seams.

Families with greedy pre-training run their phases under DDP too. MLP and CNN are covered
at full length in test_allreduce.py; here each other family takes a couple of steps.
"""
import math

import pytest
from mlflow.tracking import MlflowClient

import models
import pipelines
from conftest import small_run

pytestmark = pytest.mark.slow

FAMILIES = [name for name in models.names() if name not in ("mlp", "cnn")]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_under_allreduce(ray_session, store, family):
    result = pipelines.train(small_run(**{
        "tracking.uri": store, "strategy.name": "allreduce", "model.name": family,
        "optim.epochs": 1, "optim.steps_per_epoch": 3, "optim.lr": 0.01}))
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert math.isfinite(run.data.metrics["train_loss"])
    tests = [k for k in run.data.metrics if k.startswith("test_")]
    assert tests and all(math.isfinite(run.data.metrics[k]) for k in tests)
    phases = getattr(result.model, "pretrain_phases", lambda: [])()
    for phase in phases:
        assert f"pretrain_{phase.name}_loss" in run.data.metrics

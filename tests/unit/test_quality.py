"""The course's accuracy bars on digits (fixed split, seed 0), single process for speed.

allreduce computes the same steps as local (test_allreduce.py holds it to that), so these
bars hold for it as well; test_allreduce.py and test_cli.py also check them end to end.
"""
import pytest
from helpers import small_run

import pipelines

pytestmark = pytest.mark.slow  # trains to accuracy bars: seconds of training


def test_mlp_reaches_0975(store):
    result = pipelines.train(small_run(**{
        "tracking.uri": store, "optim.lr": 0.1, "optim.weight_decay": 1e-3, "optim.epochs": 15}))
    assert result.metrics["test_accuracy"] >= 0.975


def test_cnn_reaches_0985(store):
    result = pipelines.train(small_run(**{"tracking.uri": store, "model.name": "cnn",
                                          "optim.epochs": 10}))
    assert result.metrics["test_accuracy"] >= 0.985

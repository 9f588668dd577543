"""Deep recurrent networks on digits (image rows as time steps)."""
import pytest
import torch
from helpers import small_run

import models
import pipelines


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_cells_stack_and_read_out_deeply(cell):
    spec = models.get("rnn")
    model = spec.build(spec.config(cell=cell, layers=3, hidden=16, head_layers=2, head_width=8),
                       (1, 8, 8), 10)
    assert model.rnn.num_layers == 3 and isinstance(model.rnn, models.rnn.CELLS[cell])
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [8, 8, 10]
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_deep_gru_reaches_095_on_digits(store):
    # 15 epochs met the bar by a hair: with numpy 2.4.6 and scikit-learn 1.9.1 (a fresh
    # install, 2026-12-02) seed 0 gave 0.928. At 25 epochs seeds 0-3 gave 0.964-0.989.
    result = pipelines.train(small_run(**{
        "tracking.uri": store, "model.name": "rnn", "model.cell": "gru", "model.layers": 2,
        "model.head_layers": 1, "optim.name": "adam", "optim.lr": 0.005, "optim.grad_clip": 1.0,
        "optim.epochs": 25}))
    assert result.metrics["test_accuracy"] >= 0.95


def test_bad_cell_is_refused():
    with pytest.raises(pipelines.ConfigError, match="rnn cell must be one of rnn, lstm, gru, got 'tree'"):
        pipelines.run.prepare(pipelines.config.load(sets=["model.name=rnn", "model.cell=tree"]))

"""Tier 1: the model registry and the first families."""
import pytest
import torch

import models
from models.registry import ModelSpec


def test_registry_lists_families_and_refuses_duplicates():
    assert {"mlp", "cnn", "rnn"} <= set(models.names())
    with pytest.raises(ValueError, match="registered twice"):
        models.register(ModelSpec("mlp", models.get("mlp").config, models.get("mlp").build))
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        models.get("nope")


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("rnn", (1, 8, 8)),
                                         ("rnn", (12, 5)), ("mlp", (20,))])
def test_families_train_and_evaluate(name, shape):
    spec = models.get(name)
    model = spec.build(spec.config(), shape, 3)
    x, y = torch.randn(6, *shape), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = model.loss((x, y))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    sums = model.evaluate((x, y))
    assert sums["count"] == 6 and 0 <= sums["accuracy"] <= 6
    torch.testing.assert_close(sums["loss"] / 6, loss.detach())
    assert model.predict(x).shape == (6,)


def test_hyper_parameters_shape_the_model():
    spec = models.get("mlp")
    deep = spec.build(spec.config(depth=4, width=16, activation="sigmoid"), (64,), 10)
    linears = [m for m in deep.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16, 16, 16, 10]
    assert any(isinstance(m, torch.nn.Sigmoid) for m in deep.modules())
    cnn = models.get("cnn")
    avg = cnn.build(cnn.config(channels=[4, 4, 4], pool="avg"), (1, 8, 8), 10)
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in avg.modules()) == 3
    rnn = models.get("rnn")
    stacked = rnn.build(rnn.config(layers=3, hidden=8), (1, 8, 8), 10)
    assert stacked.rnn.num_layers == 3


def test_impossible_architectures_say_why():
    cnn = models.get("cnn")
    with pytest.raises(ValueError, match="too many stages"):
        cnn.build(cnn.config(channels=[4, 4, 4, 4]), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="needs image input"):
        cnn.build(cnn.config(), (64,), 10)
    with pytest.raises(ValueError, match="unknown activation"):
        models.get("mlp").build(models.get("mlp").config(activation="swishy"), (64,), 10)

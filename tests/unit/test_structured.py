"""Tier 1: structured layers are the matrices they claim to be, and train as well as dense.

Each layer is checked against the dense matrix it stands for, built independently here
from its parameters, so a wrong transform, permutation or padding cannot hide behind a
loss that still goes down.
"""
import math

import pytest
import torch
from helpers import small_run
from torch import nn

import models
import pipelines
from models.structured import CirculantLinear, FastfoodLinear, LocallyConnected2d, fwht, projection
from pipelines import config
from pipelines.run import prepare


def hadamard(d: int) -> torch.Tensor:
    """The ±1 Sylvester-Hadamard matrix, by Kronecker doubling (not by the code under test)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def circulant_matrix(layer: CirculantLinear) -> torch.Tensor:
    r, d = layer.weight.detach(), layer.d
    i, j = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    full = r[(i - j) % d]                              # circ(r)
    full = full[:, : layer.in_features] * layer.D      # times D (padded columns meet zeros)
    return full[: layer.out_features]


def fastfood_matrix(layer: FastfoodLinear) -> torch.Tensor:
    d, h = layer.d, hadamard(layer.d)
    blocks = []
    for b in range(layer.blocks):
        S, G, B = (torch.diag(p.detach()[b]) for p in (layer.S, layer.G, layer.B))
        P = torch.eye(d, dtype=torch.float64)[layer.perm[b] - b * d]  # (P z)_i = z[perm_i]
        blocks.append(S @ h @ G @ P @ h @ B)
    return torch.cat(blocks)[: layer.out_features, : layer.in_features]


@pytest.mark.parametrize("d", [1, 2, 32, 64, 2048])  # no pass, one, two, three
def test_fwht_is_the_hadamard_matrix(d):
    x = torch.randn(2, 3, d, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ hadamard(d))


def test_fwht_refuses_other_sizes():
    with pytest.raises(ValueError, match="power of two, got 12"):
        fwht(torch.zeros(3, 12))


@pytest.mark.parametrize("n_in, n_out", [(16, 16), (10, 16), (16, 10), (7, 5)])
def test_circulant_is_its_dense_circulant_matrix(n_in, n_out):
    torch.manual_seed(0)
    layer = CirculantLinear(n_in, n_out).double()
    assert layer.d == max(n_in, n_out)
    x = torch.randn(5, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ circulant_matrix(layer).T + layer.bias)


@pytest.mark.parametrize("n_in, n_out, d, blocks", [
    (16, 16, 16, 1),   # power of two, square
    (10, 16, 16, 1),   # input padded 10 -> 16
    (10, 40, 16, 3),   # padded, three stacked blocks, output cut 48 -> 40
    (32, 8, 32, 1),    # output cut 32 -> 8
])
def test_fastfood_is_its_product_of_matrices(n_in, n_out, d, blocks):
    torch.manual_seed(0)
    layer = FastfoodLinear(n_in, n_out).double()
    assert (layer.d, layer.blocks) == (d, blocks)
    x = torch.randn(2, 3, n_in, dtype=torch.float64)  # leading dimensions pass through
    torch.testing.assert_close(layer(x), x @ fastfood_matrix(layer).T + layer.bias)


@pytest.mark.parametrize("cls, n_in, n_out, count", [
    (FastfoodLinear, 64, 256, 3 * 4 * 64 + 256),
    (FastfoodLinear, 256, 256, 3 * 256 + 256),
    (FastfoodLinear, 100, 300, 3 * 3 * 128 + 300),
    (CirculantLinear, 64, 256, 256 + 256),
    (CirculantLinear, 256, 256, 256 + 256),
    (CirculantLinear, 300, 100, 300 + 100),
])
def test_gradients_flow_and_parameters_are_linear_in_size(cls, n_in, n_out, count):
    layer = cls(n_in, n_out)
    assert sum(p.numel() for p in layer.parameters()) == count
    assert count < n_in * n_out / 10
    layer(torch.randn(8, n_in)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_random_parts_are_seeded_and_travel_in_the_state_dict():
    for cls in (FastfoodLinear, CirculantLinear):
        torch.manual_seed(1)
        a = cls(20, 30)
        torch.manual_seed(1)
        same = cls(20, 30)
        other = cls(20, 30)
        x = torch.randn(4, 20)
        torch.testing.assert_close(same(x), a(x))
        other.load_state_dict(a.state_dict())  # the fixed signs and permutations included
        torch.testing.assert_close(other(x), a(x))


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_locally_connected_with_equal_weights_is_a_convolution(stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding)
    local = LocallyConnected2d(3, 5, 3, (6, 7), stride=stride, padding=padding)
    x = torch.randn(4, 3, 6, 7)
    positions = local.out_size[0] * local.out_size[1]
    assert local.weight.numel() == positions * conv.weight.numel()
    with torch.no_grad():
        local.weight.copy_(conv.weight.reshape(5, -1).expand(positions, -1, -1))
        local.bias.copy_(conv.bias[:, None, None].expand_as(local.bias))
    torch.testing.assert_close(local(x), conv(x))


def test_defaults_build_exactly_the_dense_modules():
    mlp = models.get("mlp")
    torch.manual_seed(0)
    built = mlp.build(mlp.config(), (1, 8, 8), 10)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 10))
    assert [type(m) for m in built.net] == [type(m) for m in plain]
    for (k, v), (k2, v2) in zip(built.net.state_dict().items(), plain.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=0)
    cnn = models.get("cnn")
    kinds = {type(m) for m in cnn.build(cnn.config(), (1, 8, 8), 10).modules()}
    assert nn.Conv2d in kinds and not kinds & {LocallyConnected2d, FastfoodLinear, CirculantLinear}


@pytest.mark.parametrize("kernel", [2, 3, 4])  # even kernels grow the map by one
@pytest.mark.parametrize("conv", ["conv", "local"])
def test_cnn_stages_fit_any_kernel_and_map(conv, kernel):
    cnn = models.get("cnn")
    model = cnn.build(cnn.config(channels=[4, 4], kernel_size=kernel, conv=conv,
                                 projection="fastfood"), (3, 7, 9), 10)
    assert model(torch.randn(2, 3, 7, 9)).shape == (2, 10)


def _hidden_parameters(model) -> int:
    """Parameters of every layer but the (always dense) output layer."""
    return sum(p.numel() for m in list(model.net)[:-1] for p in m.parameters())


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_structured_mlp_matches_dense_accuracy_with_far_fewer_parameters(store):
    # Adam: the structured layers' parameters are shared by many matrix entries (and
    # Fastfood's multiply), which plain SGD at the dense layers' rate handles badly.
    settings = {"tracking.uri": store, "optim.name": "adam", "optim.lr": 0.002,
                "optim.epochs": 20, "model.width": 256}
    results = {kind: pipelines.train(small_run(**settings, **{"model.projection": kind}))
               for kind in ("dense", "fastfood", "circulant")}
    accuracy = {k: r.metrics["test_accuracy"] for k, r in results.items()}
    params = {k: _hidden_parameters(r.model) for k, r in results.items()}
    assert params == {"dense": 64 * 256 + 256 + 256 * 256 + 256,
                      "fastfood": 2 * (3 * 256 + 256), "circulant": 2 * (256 + 256)}
    assert accuracy["dense"] > 0.95, accuracy
    for kind in ("fastfood", "circulant"):
        assert accuracy[kind] >= accuracy["dense"] - 0.015, accuracy
        assert params[kind] * 4 <= params["dense"], params


def test_cnn_with_local_stages_and_circulant_head_trains(store):
    result = pipelines.train(small_run(**{
        "tracking.uri": store, "model.name": "cnn", "model.conv": "local",
        "model.projection": "circulant", "optim.name": "adam", "optim.lr": 0.002,
        "optim.epochs": 3}))
    kinds = {type(m) for m in result.model.modules()}
    assert {LocallyConnected2d, CirculantLinear} <= kinds and nn.Conv2d not in kinds
    assert all(math.isfinite(epoch["train_loss"]) for epoch in result.history)
    assert math.isfinite(result.metrics["test_loss"])
    assert result.metrics["test_accuracy"] > 0.8  # chance: 0.1


def test_unknown_kinds_are_named():
    with pytest.raises(ValueError, match="unknown projection 'bogus'"):
        projection("bogus", 4, 4)
    mlp, cnn = models.get("mlp"), models.get("cnn")
    with pytest.raises(ValueError, match="'bogus'"):
        mlp.build(mlp.config(projection="bogus"), (64,), 10)
    with pytest.raises(ValueError, match="'bogus'"):
        cnn.build(cnn.config(projection="bogus"), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown conv 'strided'"):
        cnn.build(cnn.config(conv="strided"), (1, 8, 8), 10)
    cfg = config.load(sets=["model.projection=bogus"])
    with pytest.raises(pipelines.ConfigError, match="unknown projection 'bogus'"):
        prepare(cfg)

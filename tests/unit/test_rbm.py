"""The energy-based families: rbm (CD-k and PCD) and dbn (greedy pre-training, fine-tuning)."""
import itertools

import numpy as np
import pytest
import torch
from helpers import small_run
from mlflow.tracking import MlflowClient

import models
import pipelines
from models.rbm import RBM, RBMConfig, build_rbm
from pipelines import config as run_config
from pipelines.run import prepare
from pipelines.training.loop import build_model, evaluate_sums, mean_metrics


def _tiny_rbm(visible=4, hidden=3, seed=0, **kwargs) -> RBM:
    torch.manual_seed(seed)
    rbm = RBM(visible, hidden, **kwargs).double()
    with torch.no_grad():  # weights large enough for the terms to matter
        rbm.linear.weight.normal_(0.0, 1.0)
        rbm.linear.bias.normal_(0.0, 1.0)
        rbm.visible_bias.normal_(0.0, 1.0)
    return rbm


def test_free_energy_is_minus_log_sum_over_hidden_states():
    rbm = _tiny_rbm(4, 3)
    v = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)
    hs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
    energies = torch.stack([rbm.energy(v, h.expand(len(v), -1)) for h in hs], dim=1)  # (16, 8)
    torch.testing.assert_close(rbm.free_energy(v), -torch.logsumexp(-energies, dim=1))
    # and the energy is -vᵀWh - bᵀv - dᵀh with W = linear.weight.T, d = linear.bias
    W, d, b = rbm.linear.weight.T, rbm.linear.bias, rbm.visible_bias
    h = hs[5].expand(len(v), -1)
    torch.testing.assert_close(rbm.energy(v, h), -((v @ W) * h).sum(1) - v @ b - h @ d)


@pytest.mark.parametrize("persistent", [False, True])
def test_loss_gradient_is_the_contrastive_divergence_gradient(persistent):
    rbm = _tiny_rbm(12, 5, cd_k=2, persistent=persistent, chains=7)
    x = torch.rand(9, 1, 3, 4, dtype=torch.float64)
    torch.manual_seed(1)
    rbm.loss((x, torch.zeros(9))).backward()
    v = (x.flatten(1) > 0.5).double()
    if persistent:
        negative = rbm.chains.clone()  # the chains as advanced by that update
        assert negative.shape == (7, 12)
    else:
        torch.manual_seed(1)
        negative = rbm.negative_samples(v)  # the same samples: same seed, same draws
    assert set(negative.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        h_data, h_model = rbm.hidden_probs(v), rbm.hidden_probs(negative)
        # ascent direction of CD: <v hᵀ>_data - <v hᵀ>_model; the loss descends, so minus it
        dW = v.T @ h_data / len(v) - negative.T @ h_model / len(negative)
        db = v.mean(0) - negative.mean(0)
        dd = h_data.mean(0) - h_model.mean(0)
    torch.testing.assert_close(rbm.linear.weight.grad, -dW.T)
    torch.testing.assert_close(rbm.visible_bias.grad, -db)
    torch.testing.assert_close(rbm.linear.bias.grad, -dd)


def test_pseudo_likelihood_matches_scikit_learn():
    from sklearn.datasets import load_digits
    from sklearn.neural_network import BernoulliRBM

    x = (load_digits().data[:200] / 16.0 > 0.5).astype(np.float64)
    theirs = BernoulliRBM(n_components=16, n_iter=3, learning_rate=0.05, random_state=3).fit(x)
    ours = RBM(64, 16).double()
    with torch.no_grad():
        ours.linear.weight.copy_(torch.from_numpy(theirs.components_))
        ours.linear.bias.copy_(torch.from_numpy(theirs.intercept_hidden_))
        ours.visible_bias.copy_(torch.from_numpy(theirs.intercept_visible_))
    # score_samples flips, in each example, the bit RandomState(random_state) draws
    flip = np.random.RandomState(3).randint(0, x.shape[1], x.shape[0])
    expected = theirs.score_samples(x)
    got = ours.pseudo_likelihood(torch.from_numpy(x), torch.from_numpy(flip))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10)
    assert expected.std() > 1  # a comparison of numbers that differ
    # evaluate sums the same estimator, its bits drawn by a seeded generator: deterministic
    batch = (torch.from_numpy(x).reshape(-1, 1, 8, 8), torch.zeros(len(x)))
    first, again = ours.evaluate(batch), ours.evaluate(batch)
    assert first["count"] == len(x)
    torch.testing.assert_close(first["pseudo_likelihood"], again["pseudo_likelihood"])
    assert abs(first["pseudo_likelihood"].item() / len(x) - expected.mean()) < 0.2 * abs(expected.mean())


def _untrained_val_metrics(cfg):
    data, _ = prepare(cfg)
    model = build_model(cfg, data)
    return mean_metrics(evaluate_sums(model, data.x_val, data.y_val), "val")


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
@pytest.mark.parametrize("persistent", [False, True], ids=["cd1", "pcd"])
def test_training_raises_pseudo_likelihood_and_lowers_recon_error(store, persistent):
    cfg = small_run(**{"tracking.uri": store, "model.name": "rbm", "model.hidden": 64,
                       "model.persistent": persistent, "optim.lr": 0.02, "data.batch_size": 16,
                       "optim.epochs": 10})
    before = _untrained_val_metrics(cfg)
    result = pipelines.train(cfg)
    history = result.history
    assert len(history) == 10
    first, last = history[0], history[-1]
    print(f"persistent={persistent}: val_pseudo_likelihood untrained {before['val_pseudo_likelihood']:.2f}, "
          f"epoch 1 {first['val_pseudo_likelihood']:.2f}, epoch 10 {last['val_pseudo_likelihood']:.2f}; "
          f"val_recon_error {before['val_recon_error']:.4f} -> {first['val_recon_error']:.4f} -> "
          f"{last['val_recon_error']:.4f}; test {result.metrics}")
    assert before["val_pseudo_likelihood"] < first["val_pseudo_likelihood"] - 10
    assert last["val_pseudo_likelihood"] > first["val_pseudo_likelihood"] + 2
    assert last["val_recon_error"] < 0.75 * first["val_recon_error"] < 0.75 * before["val_recon_error"]
    assert {"test_pseudo_likelihood", "test_recon_error"} <= set(result.metrics)
    assert "test_accuracy" not in result.metrics
    assert result.model.task == "generative"
    hidden = result.model(torch.rand(5, 1, 8, 8))
    assert hidden.shape == (5, 64) and 0 <= hidden.min() and hidden.max() <= 1


def test_rbm_run_logs_filters_and_gibbs_samples(store):
    result = pipelines.train(small_run(**{"tracking.uri": store, "tracking.figures": True,
                                          "model.name": "rbm",
                                          "model.hidden": 32, "optim.epochs": 1}))
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(result.run_id)}
    assert {"first_layer_filters.png", "gibbs_samples.png", "reconstructions.png",
            "loss_curve.png"} <= artifacts
    assert "confusion_matrix.png" not in artifacts
    pictures = result.model.pictures(torch.rand(20, 1, 8, 8))
    assert pictures["gibbs_samples"].shape == (20, 8, 8)
    assert pictures["reconstructions"].shape == (40, 8, 8)
    torch.testing.assert_close(result.model.pictures(torch.rand(20, 1, 8, 8))["gibbs_samples"],
                               pictures["gibbs_samples"])  # fixed seed
    flat = build_rbm(RBMConfig(hidden=4), (20,))
    assert flat.pictures(torch.rand(20, 20)) == {}  # not an image: nothing to draw


def test_dbn_phases_train_only_their_rbm_and_fine_tuning_uses_every_parameter():
    spec = models.get("dbn")
    dbn = spec.build(spec.config(layers=[16, 8], pretrain_epochs=3), (1, 8, 8), 10)
    phases = dbn.pretrain_phases()
    assert [(p.name, p.epochs) for p in phases] == [("rbm1", 3), ("rbm2", 3)]
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    for phase, layer in zip(phases, dbn.layers):
        params = dict(phase.module.named_parameters())
        assert set(params) == {"linear.weight", "linear.bias", "visible_units.bias"}
        assert params["linear.weight"] is layer.weight  # the RBM's W is the network's layer
        phase.module.loss((x, y)).backward()
        assert all(p.grad is not None for p in params.values())
    dbn.zero_grad(set_to_none=True)
    dbn.loss((x, y)).backward()
    assert all(p.grad is not None for p in dbn.parameters())  # nothing unused under DDP
    assert dbn.predict(x).shape == (6,)
    assert spec.build(spec.config(layers=[16, 8], pretrain_epochs=0), (1, 8, 8), 10).pretrain_phases() == []


def test_dbn_dropout_drops_hidden_units_while_fine_tuning_only():
    spec = models.get("dbn")
    torch.manual_seed(0)
    dbn = spec.build(spec.config(layers=[64, 32], dropout=0.5), (1, 8, 8), 10)
    x = torch.rand(50, 1, 8, 8)
    dbn.train()
    dropped = dbn.up(x)
    assert 0.3 < (dropped == 0).float().mean() < 0.7  # about half of the top layer's units
    dbn.eval()
    torch.testing.assert_close(dbn.up(x), dbn.up(x))  # evaluation: deterministic, nothing dropped
    assert (dbn.up(x) > 0).all()  # sigmoid activations, none zeroed
    with pytest.raises(ValueError, match=r"dbn dropout must be in \[0, 1\), got 1.0"):
        spec.build(spec.config(dropout=1.0), (1, 8, 8), 10)


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_dbn_pretrains_each_layer_then_fine_tunes_to_high_accuracy(store):
    result = pipelines.train(small_run(**{
        "tracking.uri": store, "tracking.figures": True, "model.name": "dbn", "model.layers": [512, 256],
        "model.pretrain_epochs": 20, "optim.lr": 0.1, "data.batch_size": 16, "optim.epochs": 20,
        "seed": 1}))
    client = MlflowClient(store)
    for name in ("rbm1", "rbm2"):
        losses = client.get_metric_history(result.run_id, f"pretrain_{name}_loss")
        assert sorted(m.step for m in losses) == list(range(20)), name
    print(f"dbn test_accuracy {result.metrics['test_accuracy']:.4f}, "
          f"val_accuracy per epoch {[round(h['val_accuracy'], 3) for h in result.history]}")
    assert result.metrics["test_accuracy"] >= 0.97
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"first_layer_filters.png", "confusion_matrix.png"} <= artifacts


@pytest.mark.parametrize("name, field, value, message", [
    ("rbm", "cd_k", 0, "rbm cd_k must be >= 1, got 0"),
    ("rbm", "hidden", 0, "rbm hidden must be >= 1, got 0"),
    ("dbn", "cd_k", 0, "dbn cd_k must be >= 1, got 0"),
    ("dbn", "pretrain_epochs", -1, "dbn pretrain_epochs must be >= 0, got -1"),
    ("dbn", "layers", [64, 0], r"dbn layers must hold positive sizes, got \[64, 0\]"),
])
def test_impossible_hyper_parameters_say_why(name, field, value, message):
    spec = models.get(name)
    with pytest.raises(ValueError, match=message):
        spec.build(spec.config(**{field: value}), (1, 8, 8), 10)
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    cfg = run_config.load(sets=["strategy.name=local", f"model.name={name}", f"model.{field}={text}"])
    with pytest.raises(pipelines.ConfigError, match=message):
        prepare(cfg)


def test_persistent_rbm_needs_chains():
    with pytest.raises(ValueError, match="rbm chains must be >= 1, got 0"):
        build_rbm(RBMConfig(persistent=True, chains=0), (1, 8, 8))

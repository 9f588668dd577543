"""Autoencoders (plain, denoising, stacked) and the variational autoencoder, on digits."""
import mlflow
import mlflow.pytorch
import pytest
import torch
from helpers import small_run
from mlflow.tracking import MlflowClient

import models
import pipelines
from pipelines import config as configs
from pipelines import data as datasets
from pipelines.run import prepare

SHAPE = (1, 8, 8)


def _data(cfg):
    return datasets.load(cfg.data, cfg.seed)


def _mean_image_error(cfg) -> float:
    """Test error of the best constant reconstruction: the mean training image."""
    data = _data(cfg)
    mean = data.x_train.mean(dim=0)
    return ((data.x_test - mean) ** 2).flatten(1).mean(dim=1).mean().item()


def _artifacts(store, run_id) -> set[str]:
    return {a.path for a in MlflowClient(store).list_artifacts(run_id)}


# --- the contract, family by family ---------------------------------------------------

@pytest.mark.parametrize("name", ["autoencoder", "dae", "sae", "vae", "ssvae"])
@pytest.mark.parametrize("shape", [SHAPE, (20,)])
def test_families_follow_the_model_contract(name, shape):
    spec = models.get(name)
    model = spec.build(spec.config(), shape, 10)
    x, y = torch.rand(6, *shape), torch.arange(6)
    loss = model.loss((x, y))
    assert loss.dim() == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs no unused ones
    model.eval()
    sums = model.evaluate((x, y))
    assert float(sums["count"]) == 6
    out = model(x)
    if name in ("sae", "ssvae"):
        assert model.task == "classification" and out.shape == (6, 10)
        assert model.predict(x).shape == (6,) and 0 <= float(sums["accuracy"]) <= 6
    else:
        assert model.task != "classification" and out.shape == (6, *shape)
        assert 0 <= float(sums["recon_error"]) / 6 <= 1
    pictures = model.pictures(x) if hasattr(model, "pictures") else {}
    if len(shape) == 1:
        assert pictures == {}
    for images in pictures.values():
        assert images.min() >= 0 and images.max() <= 1 and images.shape[-2:] == shape[-2:]


def test_reconstructions_interleave_inputs_and_outputs():
    spec = models.get("autoencoder")
    model = spec.build(spec.config(), SHAPE, 10).eval()
    x = torch.rand(20, *SHAPE)
    grid = model.pictures(x)["reconstructions"]
    assert grid.shape == (40, 8, 8)
    torch.testing.assert_close(grid[:10], x[:10, 0])
    torch.testing.assert_close(grid[10:20], model(x[:10])[:, 0].clamp(0, 1))
    torch.testing.assert_close(grid[20:30], x[10:, 0])


# --- autoencoder and dae ---------------------------------------------------------------

@pytest.mark.parametrize("name, extra", [
    ("autoencoder", {"tracking.log_model": True}),
    ("dae", {}),
    ("dae", {"model.corruption": "gaussian", "model.corruption_level": 0.3, "model.recon": "bce"}),
])
@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_autoencoders_reconstruct_far_better_than_the_mean_image(store, name, extra):
    cfg = small_run(**{"tracking.uri": store, "tracking.figures": True, "model.name": name,
                       "optim.name": "adam",
                       "optim.lr": 0.01, "optim.epochs": 10, **extra})
    result = pipelines.train(cfg)
    baseline = _mean_image_error(cfg)
    assert result.metrics["test_recon_error"] < 0.5 * baseline, (result.metrics, baseline)
    history = [h["val_recon_error"] for h in result.history]
    assert history[-1] < history[0]
    assert {"reconstructions.png", "loss_curve.png", "first_layer_filters.png"} <= _artifacts(
        store, result.run_id)
    assert "confusion_matrix.png" not in _artifacts(store, result.run_id)
    if extra.get("tracking.log_model"):
        mlflow.set_tracking_uri(store)
        loaded = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
        x = torch.rand(4, *SHAPE)
        torch.testing.assert_close(loaded(x), result.model(x))


def _encoder_inputs(model, x):
    """What the encoder is fed when the model computes its loss on `x`."""
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    loss = model.loss((x, torch.zeros(len(x), dtype=torch.long)))
    handle.remove()
    return seen[0], loss


def test_dae_corrupts_its_input_in_training_only():
    spec = models.get("dae")
    torch.manual_seed(0)
    x = torch.rand(50, *SHAPE) + 0.1  # no zeros of its own
    masked = spec.build(spec.config(corruption="mask", corruption_level=0.5), SHAPE, 10)
    fed, loss = _encoder_inputs(masked.train(), x)
    zeroed = fed == 0
    assert 0.4 < zeroed.float().mean() < 0.6
    torch.testing.assert_close(fed[~zeroed], x[~zeroed])
    # the target is the clean input: the loss is the error of reconstructing x from `fed`
    with torch.no_grad():
        expected = ((masked(fed) - x) ** 2).flatten(1).sum(dim=1).mean()
    torch.testing.assert_close(loss.detach(), expected)
    fed_eval, loss_eval = _encoder_inputs(masked.eval(), x)
    torch.testing.assert_close(fed_eval, x)
    _, again = _encoder_inputs(masked, x)
    assert loss_eval == again  # evaluation is deterministic
    sums = masked.evaluate((x, torch.zeros(50)))
    torch.testing.assert_close(sums["loss"] / 50, loss_eval.detach())

    noisy = spec.build(spec.config(corruption="gaussian", corruption_level=0.2), SHAPE, 10)
    fed, _ = _encoder_inputs(noisy.train(), x)
    assert 0.15 < (fed - x).std() < 0.25
    fed_eval, _ = _encoder_inputs(noisy.eval(), x)
    torch.testing.assert_close(fed_eval, x)

    # a fully masked input leaves nothing to see: the loss is that of the all-zero input
    blind = spec.build(spec.config(corruption_level=1.0), SHAPE, 10).train()
    with torch.no_grad():
        expected = ((blind(torch.zeros_like(x)) - x) ** 2).flatten(1).sum(dim=1).mean()
    torch.testing.assert_close(blind.loss((x, None)).detach(), expected)


@pytest.mark.parametrize("name, params, words", [
    ("dae", {"corruption_level": 1.5}, "dae corruption level must be in [0, 1], got 1.5"),
    ("dae", {"corruption_level": -0.1}, "got -0.1"),
    ("dae", {"corruption": "salt"}, "'salt'"),
    ("autoencoder", {"recon": "l1"}, "'l1'"),
    ("autoencoder", {"code": 0}, "[0]"),
    ("sae", {"layers": []}, "layers=[]"),
    ("sae", {"pretrain_epochs": -1}, "got -1"),
    ("vae", {"latent": 0}, "[0]"),
    ("vae", {"hidden": [64, 0]}, "[64, 0]"),
    ("ssvae", {"labelled_fraction": 1.5}, "ssvae labelled_fraction must be in [0, 1], got 1.5"),
])
def test_impossible_hyper_parameters_say_why(name, params, words):
    spec = models.get(name)
    with pytest.raises(ValueError) as error:
        spec.build(spec.config(**params), SHAPE, 10)
    assert words in str(error.value)


def test_a_bad_corruption_level_is_a_config_error():
    cfg = configs.load(sets=["strategy.name=local", "model.name=dae", "model.corruption_level=1.5"])
    with pytest.raises(pipelines.ConfigError, match=r"1\.5") as error:
        prepare(cfg)
    assert "\n" not in str(error.value)


# --- stacked autoencoder ---------------------------------------------------------------

def test_sae_phases_train_one_layer_each_on_frozen_codes():
    spec = models.get("sae")
    model = spec.build(spec.config(layers=[32, 16, 8], pretrain_epochs=2), SHAPE, 10)
    phases = model.pretrain_phases()
    assert [(p.name, p.epochs) for p in phases] == [("layer1", 2), ("layer2", 2), ("layer3", 2)]
    x = torch.rand(8, *SHAPE)
    for i, phase in enumerate(phases):
        trained = {id(p) for p in phase.module.parameters()}
        assert {id(p) for p in model.hidden[i].parameters()} <= trained
        others = [p for j, layer in enumerate(model.hidden) if j != i for p in layer.parameters()]
        assert not trained & {id(p) for p in [*others, *model.head.parameters()]}
        before = [p.detach().clone() for p in others]
        optimizer = torch.optim.SGD(phase.module.parameters(), lr=0.1)
        phase.module.train()
        phase.module.loss((x, None)).backward()
        # no unused parameters (DDP would refuse them) and nothing else moves
        assert all(p.grad is not None for p in phase.module.parameters())
        optimizer.step()
        for p, old in zip(others, before):
            torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
        model.zero_grad(set_to_none=True)
    assert spec.build(spec.config(pretrain_epochs=0), SHAPE, 10).pretrain_phases() == []


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_sae_pretrains_greedily_then_fine_tunes_to_97_percent(store):
    pretrain_epochs = 10
    result = pipelines.train(small_run(**{
        "tracking.uri": store, "tracking.figures": True, "model.name": "sae", "model.layers": [512, 256],
        "model.pretrain_epochs": pretrain_epochs, "model.corruption_level": 0.3, "model.dropout": 0.5,
        "optim.name": "adam", "optim.lr": 0.001, "optim.epochs": 60}))
    client = MlflowClient(store)
    for layer in ("layer1", "layer2"):
        history = sorted(client.get_metric_history(result.run_id, f"pretrain_{layer}_loss"),
                         key=lambda m: m.step)
        assert [m.step for m in history] == list(range(pretrain_epochs))
        assert history[-1].value < 0.5 * history[0].value, [m.value for m in history]
    # seeds 0-4 of this setting: 0.975-0.986 (seed 0: 0.981)
    assert result.metrics["test_accuracy"] >= 0.97, result.metrics
    assert {"confusion_matrix.png", "loss_curve.png"} <= _artifacts(store, result.run_id)


# --- variational autoencoder -----------------------------------------------------------

def test_vae_binarizes_and_evaluates_deterministically():
    spec = models.get("vae")
    model = spec.build(spec.config(), SHAPE, 10).eval()
    x = torch.rand(16, *SHAPE)
    binary = (x > 0.5).float()
    torch.testing.assert_close(model(x), model(binary))
    first, second = model.evaluate((x, None)), model.evaluate((x, None))
    assert first == second
    assert float(first["elbo"]) < 0 and float(first["loss"]) == -float(first["elbo"])
    # the training estimate (one sample) and the evaluation estimate agree on average
    torch.manual_seed(0)
    estimates = torch.stack([model.loss((x, None)) for _ in range(200)])
    assert abs(-estimates.mean() - float(first["elbo"]) / 16) < 1.0
    samples = model.sample(20)
    assert samples.shape == (20, *SHAPE) and 0 <= samples.min() and samples.max() <= 1
    torch.testing.assert_close(samples, model.sample(20))


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_vae_elbo_beats_independent_pixels_and_improves(store):
    cfg = small_run(**{"tracking.uri": store, "tracking.figures": True, "model.name": "vae",
                       "optim.name": "adam",
                       "optim.lr": 0.003, "optim.epochs": 10})
    result = pipelines.train(cfg)
    elbo = result.metrics["test_elbo"]
    assert elbo > -60, result.metrics
    # the log-likelihood of the best model with independent pixels, a bound the VAE must beat
    data = _data(cfg)
    train, test = ((d > 0.5).float().flatten(1) for d in (data.x_train, data.x_test))
    p = train.mean(dim=0).clamp(1e-3, 1 - 1e-3)
    independent = (test * p.log() + (1 - test) * (1 - p).log()).sum(dim=1).mean().item()
    assert elbo > independent + 2, (elbo, independent)
    history = [h["val_elbo"] for h in result.history]
    assert history[-1] > history[0] + 5, history
    assert result.metrics["test_recon_error"] < 0.1
    assert {"samples.png", "reconstructions.png", "loss_curve.png"} <= _artifacts(store, result.run_id)


# --- semi-supervised VAE (M2) ----------------------------------------------------------

def test_ssvae_uses_only_the_labels_of_its_labelled_fraction():
    spec = models.get("ssvae")
    cfg = small_run()
    x_train = _data(cfg).x_train
    model = spec.build(spec.config(labelled_fraction=0.1), SHAPE, 10)
    labelled = model.labelled(x_train)
    assert 0.07 < labelled.float().mean() < 0.13
    torch.testing.assert_close(labelled, model.labelled(x_train.flip(0)).flip(0))  # per example
    assert spec.build(spec.config(labelled_fraction=1.0), SHAPE, 10).labelled(x_train).all()
    unlabelled = spec.build(spec.config(labelled_fraction=0.0), SHAPE, 10)
    assert not unlabelled.labelled(x_train).any()
    x = x_train[:32]
    y = torch.randint(0, 10, (32,))
    torch.manual_seed(0)
    first = unlabelled.loss((x, y))
    torch.manual_seed(0)
    assert unlabelled.loss((x, (y + 1) % 10)) == first  # labels unseen


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_ssvae_learns_from_a_tenth_of_the_labels(store):
    result = pipelines.train(small_run(**{
        "tracking.uri": store, "tracking.figures": True, "model.name": "ssvae",
        "model.labelled_fraction": 0.1,
        "optim.name": "adam", "optim.lr": 0.003, "optim.epochs": 20}))
    # seeds 0-2: 0.93-0.94; a classifier trained on the same 135 labels alone: 0.91
    assert result.metrics["test_accuracy"] >= 0.88, result.metrics
    assert result.metrics["test_elbo"] > -30, result.metrics
    assert {"samples.png", "reconstructions.png", "confusion_matrix.png"} <= _artifacts(
        store, result.run_id)

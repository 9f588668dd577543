"""The Deep Kalman Filter's bound and likelihood estimate, its masks and its seams, on tiny
models (no Ray): the quality bars against the exact Kalman likelihood are in
tests/strategies/test_dkf_quality.py."""
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from models.dkf import DeepKalmanFilter, DKFConfig, gaussian_kl
from pipelines import data as datasets
from pipelines.config import ConfigError, DataSection, from_dict, validate
from pipelines.errors import DataError
from pipelines.sequence_config import SequenceSection
from pipelines.training.loop import evaluate_sums, mean_metrics


def tiny(shape=(6, 3), **options) -> DeepKalmanFilter:
    torch.manual_seed(0)
    return DeepKalmanFilter(DKFConfig(latent=2, hidden=8, rnn_hidden=8, **options), shape)


def test_the_closed_form_kl_is_torchs():
    g = torch.Generator().manual_seed(1)
    mu_q, mu_p, lv_q, lv_p = (torch.randn(5, 3, generator=g) for _ in range(4))
    expected = kl_divergence(Independent(Normal(mu_q, (0.5 * lv_q).exp()), 1),
                             Independent(Normal(mu_p, (0.5 * lv_p).exp()), 1))
    # float32 sums of 3 terms of size O(10): a few ulps of 10 each
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, mu_p, lv_p), expected, rtol=1e-5, atol=1e-5)


def test_a_masked_tail_is_the_truncated_sequence():
    """A padded tail adds no likelihood and no KL: the terms of a length-4 sequence padded to
    6 steps are those of the 4 steps alone (the same noise: z_t is drawn in step order)."""
    model = tiny()
    x = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(5, 6)
    mask[:, 4:] = 0
    padded = model.sequence_terms(x, mask, samples=3, generator=torch.Generator().manual_seed(3))
    short = model.sequence_terms(x[:, :4], mask[:, :4], samples=3, generator=torch.Generator().manual_seed(3))
    for key in ("log_px", "kl", "log_ratio"):
        # the same terms plus exact zeros, summed in another order, and the GRU run fused over
        # 4 steps against step by step over 6: float32 rounding of sums of at most 6 terms of
        # size ~20 through a few layers, well inside 1e-5 relative (a wrong mask is off by whole nats)
        torch.testing.assert_close(padded[key], short[key], rtol=1e-5, atol=1e-4, msg=key)


def test_a_masked_middle_step_adds_no_likelihood_but_keeps_its_latent():
    model = tiny()
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(4, 6)
    mask[:, 2] = 0
    changed = x.clone()
    changed[:, 2] = 100.0  # what an unobserved step holds does not matter
    a = model.sequence_terms(x, mask, generator=torch.Generator().manual_seed(5))
    b = model.sequence_terms(changed, mask, generator=torch.Generator().manual_seed(5))
    full = model.sequence_terms(x, torch.ones(4, 6), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["log_px"], b["log_px"]) and torch.equal(a["kl"], b["kl"])
    assert not torch.equal(a["log_px"], full["log_px"])


def test_the_log_ratio_is_an_unbiased_kl_estimate():
    """E_q[log q - log p] at the sampled z is the KL summed in closed form: the mean of
    log_px - log_ratio - kl over draws is 0 within four standard errors of its own spread."""
    model = tiny()
    x = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(6))
    terms = model.sequence_terms(x, torch.ones(3, 6), samples=4000, generator=torch.Generator().manual_seed(7))
    gap = (terms["log_px"] - terms["log_ratio"] - terms["kl"]).double()
    error = gap.std(dim=0) / math.sqrt(gap.shape[0])
    assert (gap.mean(dim=0).abs() < 4 * error + 1e-4).all(), (gap.mean(dim=0), error)


def test_importance_sampling_tightens_the_bound():
    """log-mean-exp of K draws of log p(x, z)/q(z|x) is at least their mean (Jensen), and its
    expectation grows with K towards log p(x); the ELBO is below both."""
    model = tiny(eval_samples=200)
    x = torch.randn(8, 6, 3, generator=torch.Generator().manual_seed(8))
    sums = model.evaluate((x, torch.ones(8, 6)))
    elbo, nll = float(sums["elbo_per_step"]), float(sums["nll_per_step"])
    assert -nll > elbo  # 200 draws: the gap is several nats for an untrained q


def test_per_step_metrics_are_divided_by_the_observed_steps():
    model = tiny()
    x = torch.randn(10, 6, 3, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(10, 6)
    mask[:5, 3:] = 0  # 45 observed steps
    sums = evaluate_sums(model, x, mask)
    means = mean_metrics(sums, "val")
    assert sums["steps"] == 45
    assert means["val_elbo_per_step"] == pytest.approx(sums["elbo_per_step"] / 45)
    assert means["val_loss"] == pytest.approx(sums["loss"] / 10)
    assert "val_steps" not in means


def test_the_kl_weight_anneals_over_training_steps_only():
    model = tiny(anneal_steps=4, anneal_start=0.2)
    batch = (torch.randn(4, 6, 3), torch.ones(4, 6))
    model.eval()
    model.loss(batch)
    assert model.kl_weight() == pytest.approx(0.2)
    model.train()
    weights = []
    for _ in range(6):
        weights.append(model.kl_weight())
        model.loss(batch).backward()
    assert weights == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert "steps_trained" in model.state_dict()  # a resumed run goes on annealing where it was


def test_image_frames_are_bernoulli_and_pictured_one_sequence_per_row():
    model = tiny(shape=(6, 8, 8))
    assert model.bernoulli and model.picture_columns == 6
    strip = model.pictures(torch.rand(4, 6, 8, 8))["sequences_input_reconstruction_continuation"]
    # per sequence: input, reconstruction, continuation from half-way, and 6 steps beyond the end
    assert strip.shape == (4 * 4 * 6, 8, 8)
    x = torch.rand(2, 6, 8, 8)
    longer = model.continue_sequences(x, 6, 5)
    assert longer.shape == (2, 11, 8, 8)
    # the observed part is the reconstruction, its emissions computed a step at a time instead
    # of all at once: another GEMM blocking, float32 roundings of values in [0, 1]
    torch.testing.assert_close(longer[:, :6], model(x).detach(), rtol=0, atol=1e-6)
    assert tiny().pictures(torch.rand(2, 6, 3)) == {}
    assert not tiny().bernoulli


def test_without_a_transition_each_step_is_inferred_from_its_own_frame():
    model = tiny(transition="none")
    x = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(10))
    other = x.clone()
    other[:, 3:] = -x[:, 3:]
    a = model.posterior_means(x)
    b = model.posterior_means(other)
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.equal(a[:, 3:], b[:, 3:])
    assert model.transition is None


@pytest.mark.parametrize("options, message", [
    ({"inference": "st-x"}, "dkf inference must be st-r or mf-r"),
    ({"transition": "linear"}, "dkf transition must be gated or none"),
    ({"emission": "poisson"}, "dkf emission must be auto, gaussian, bernoulli"),
    ({"anneal_start": 2.0}, "anneal_start in [0, 1]"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny(**options)


def test_dkf_and_sequence_sources_go_together():
    with pytest.raises(ValueError, match="dkf needs sequences of shape"):
        DeepKalmanFilter(DKFConfig(), (64,))
    with pytest.raises(ConfigError, match="model dkf trains on sequences: data.source must be lgssm or "
                                          "healing-digits, or a table with data.sequences.column, got 'digits'"):
        validate(from_dict({"model": {"name": "dkf"}}))
    with pytest.raises(ConfigError, match="data.source lgssm gives sequences, which model mlp "
                                          r"cannot train on: use a sequence family \(dkf\)"):
        validate(from_dict({"data": {"source": "lgssm"}}))
    with pytest.raises(ConfigError, match="data.sequences.column gives sequences, which model mlp"):
        validate(from_dict({"data": {"source": "t.parquet", "sequences": {"column": "x"}}}))
    with pytest.raises(ConfigError, match="data.stream reads a table's rows, not sequences"):
        validate(from_dict({"model": {"name": "dkf"}, "data": {"source": "t.parquet", "stream": True,
                                                               "sequences": {"column": "x"}}}))
    with pytest.raises(ConfigError, match="data.sequences.steps must be >= 1, got 0"):
        validate(from_dict({"model": {"name": "dkf"}, "data": {"source": "lgssm", "sequences": {"steps": 0}}}))


def test_lgssm_data_carries_the_kalman_limit_and_the_true_states():
    data = datasets.load(DataSection(source="lgssm", sequences=SequenceSection(samples=100, steps=5)), seed=3)
    assert data.x_train.shape[1:] == (5, 4) and data.y_train.shape[1:] == (5,)
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 100
    assert data.test_latents.shape == (len(data.x_test), 5, 2)
    assert set(data.reference) == {"val_kalman_nll_per_step", "test_kalman_nll_per_step"}
    again = datasets.load(DataSection(source="lgssm", sequences=SequenceSection(samples=100, steps=5)), seed=3)
    assert torch.equal(data.x_test, again.x_test) and data.reference == again.reference
    frames = datasets.load(DataSection(source="healing-digits", sequences=SequenceSection(steps=4)), seed=0)
    assert frames.x_train.shape[1:] == (4, 8, 8) and frames.test_latents is None and not frames.reference


def test_a_tables_column_of_sequences_is_padded_and_masked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "seqs.parquet"
    sequences = [[[float(i), float(i) + 0.5]] * (1 + i % 3) for i in range(30)]  # lengths 1, 2, 3
    pq.write_table(pa.table({"frames": sequences, "other": list(range(30))}), path)
    data = datasets.load(DataSection(source=str(path), batch_size=8, sequences=SequenceSection(column="frames")), seed=0)
    x = torch.cat([data.x_train, data.x_val, data.x_test])
    mask = torch.cat([data.y_train, data.y_val, data.y_test])
    assert x.shape == (30, 3, 2) and mask.shape == (30, 3)
    for sequence, observed in zip(x, mask):
        length = int(observed.sum())
        assert observed.tolist() == [1.0] * length + [0.0] * (3 - length)
        first = sequence[0, 0].item()
        assert length == 1 + int(first) % 3  # each row's own steps, in its own row
        assert sequence[:length].tolist() == [[first, first + 0.5]] * length
        assert not sequence[length:].any()
    with pytest.raises(DataError, match="data.sequences.column 'nope' is not a column of"):
        datasets.load(DataSection(source=str(path), sequences=SequenceSection(column="nope")), seed=0)
    with pytest.raises(DataError, match="must hold lists of steps, each a list of numbers"):
        datasets.load(DataSection(source=str(path), sequences=SequenceSection(column="other")), seed=0)

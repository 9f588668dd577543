"""Regression: a float label (or `data.task: regression`) trains with squared error on the
standardised target and reports MSE, RMSE, MAE and R² in the target's own units."""
import math

import mlflow
import mlflow.pyfunc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import small_run
from mlflow.tracking import MlflowClient
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

import pipelines
from models.targets import RegressionTarget, finish_means
from pipelines import data, split
from pipelines.config import DataSection
from pipelines.training.loop import ModelShape, build_model, mean_metrics

SCALES = [1e-3, 1.0, 50.0, 1e4]


@pytest.fixture
def prices(tmp_path):
    """A linear target of mean 1000 and scale 250 with noise, from columns of scales 1e-3 to
    1e4 and one integer column: what a raw price table looks like."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1500, len(SCALES) + 1))
    price = 1000 + 250 * (z @ rng.normal(size=z.shape[1]) + 0.2 * rng.normal(size=len(z)))
    columns = {f"c{i}": z[:, i] * s + 2 * s for i, s in enumerate(SCALES)}
    columns["rooms"] = np.clip(np.rint(3 * z[:, -1] + 10), 5, 15).astype(np.int64)
    path = tmp_path / "prices.parquet"
    pq.write_table(pa.table({**columns, "price": price}), path)
    return path


def test_the_metrics_are_scikit_learns_over_sums_any_batching_adds_up():
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.normal(50.0, 8.0, size=1000).astype(np.float32))
    predicted = y + torch.from_numpy(rng.normal(0.0, 3.0, size=1000).astype(np.float32))
    target = RegressionTarget(float(y.double().mean()), float(y.double().std()))
    output = ((predicted - target.mean) / target.std)[:, None]  # what the network would output
    # three uneven batches, summed as every strategy sums them
    sums: dict[str, float] = {}
    for part in (slice(0, 100), slice(100, 617), slice(617, None)):
        for key, value in target.sums(output[part], y[part]).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    got = mean_metrics(sums, "test")
    y64, p64 = y.double().numpy(), predicted.double().numpy()
    # float32 sums of 1000 non-negative terms are within n*u = 6e-5 of exact, relatively;
    # R² = 1 - loss / variance of the standardised target (variance ~1: nothing cancels)
    assert got["test_mse"] == pytest.approx(mean_squared_error(y64, p64), rel=2e-4)
    assert got["test_rmse"] == pytest.approx(math.sqrt(mean_squared_error(y64, p64)), rel=2e-4)
    assert got["test_mae"] == pytest.approx(mean_absolute_error(y64, p64), rel=2e-4)
    assert got["test_r2"] == pytest.approx(r2_score(y64, p64), abs=2e-4)
    assert set(got) == {"test_loss", "test_mse", "test_rmse", "test_mae", "test_r2"}
    assert finish_means({"loss": 1.0, "accuracy": 0.5}) == {"loss": 1.0, "accuracy": 0.5}


def test_a_split_without_classes_is_scikit_learns_unstratified_one():
    for n, fraction, seed in ((10, 0.2, 0), (1500, 0.2, 0), (1500, 0.1, 7), (333, 0.35, 12345)):
        train, test = split.shuffle_split(n, fraction, seed)
        theirs_train, theirs_test = train_test_split(np.arange(n), test_size=fraction, random_state=seed)
        assert np.array_equal(train, theirs_train) and np.array_equal(test, theirs_test), (n, fraction, seed)


def test_a_float_label_is_a_target_and_an_integer_one_holds_classes(prices, tmp_path):
    table = data.load(DataSection(source=str(prices), label="price"))
    assert table.task == "regression" and table.num_outputs == 1 and table.class_names == []
    assert table.y_train.dtype == torch.float32
    assert (len(table.y_train), len(table.y_val), len(table.y_test)) == (1080, 120, 300)
    y = pq.read_table(prices).column("price").to_numpy()
    rest, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0)
    train, _ = train_test_split(rest, test_size=0.1, random_state=0)
    torch.testing.assert_close(table.y_test, torch.from_numpy(y[test].astype(np.float32)), rtol=0, atol=0)
    used = y[train].astype(np.float32).astype(np.float64)  # the float32 targets, summed in float64
    assert table.target_mean == pytest.approx(used.mean(), rel=1e-12)
    assert table.target_std == pytest.approx(used.std(), rel=1e-12)
    assert table.columns == [("c0", "double"), ("c1", "double"), ("c2", "double"), ("c3", "double"),
                             ("rooms", "int64")]
    as_classes = data.load(DataSection(source=str(prices), label="rooms", task="classification"))
    assert as_classes.task == "classification" and as_classes.y_train.dtype == torch.int64
    rooms = data.load(DataSection(source=str(prices), label="rooms"))  # integers: classes by default
    assert rooms.task == "classification" and rooms.num_outputs == len(rooms.class_names) > 2
    counted = data.load(DataSection(source=str(prices), label="rooms", task="regression"))
    assert counted.task == "regression" and counted.y_train.dtype == torch.float32


@pytest.mark.parametrize("family", ["mlp", "cnn", "rnn", "sae", "dbn"])
def test_a_regressor_predicts_in_the_targets_units_and_its_pipeline_loss_is_its_loss(family):
    shape = ModelShape((1, 8, 8), 1, "regression", target_mean=1000.0, target_std=250.0)
    model = build_model(small_run(**{"model.name": family}), shape)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([900.0, 1000, 1100, 1200, 800, 1000])
    output = model(x)
    assert output.shape == (6, 1) and model.task == "regression"
    torch.testing.assert_close(model.predict(x), output[:, 0].detach() * 250 + 1000)
    torch.testing.assert_close(model.loss((x, y)), torch.mean((output[:, 0] - (y - 1000) / 250) ** 2))
    if hasattr(model, "pipeline_layers"):  # what `pipeline`'s last stage computes
        torch.testing.assert_close(model.output_loss(output, (x, y)), model.loss((x, y)))
    assert {"targets.mean", "targets.std"} <= set(model.state_dict())


@pytest.mark.slow  # trains to a bar, logs the model and loads it back: seconds
def test_a_raw_price_table_regresses_as_well_as_a_linear_model_and_its_model_takes_the_raw_frame(prices, store):
    result = pipelines.train(small_run(**{"tracking.uri": store, "data.source": str(prices), "data.label": "price",
                                          "model.depth": 1, "model.width": 64, "optim.lr": 0.01, "optim.epochs": 10,
                                          "tracking.log_model": True, "tracking.figures": True}))
    table = data.load(DataSection(source=str(prices), label="price"))
    linear = LinearRegression().fit(table.x_train.numpy(), table.y_train.numpy())
    reference = linear.score(table.x_test.numpy(), table.y_test.numpy())
    # The target is linear: least squares with p weights on n rows leaves about (1 + p/n) times
    # the noise unexplained, the linear model (p = 6) barely more than the noise, this network
    # (p = 449) up to 1.42 times it. Unscaled (data.standardize: false), the run diverges.
    p, n = result.metrics["num_params"], len(table.y_train)
    assert 1 - result.metrics["test_r2"] <= (1 + p / n) * (1 - reference), (result.metrics, reference)
    assert result.metrics["test_rmse"] == pytest.approx(math.sqrt(result.metrics["test_mse"]))
    assert "test_accuracy" not in result.metrics
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(result.run_id)}
    assert "predicted_vs_true.png" in artifacts and "confusion_matrix.png" not in artifacts

    # The logged model takes the raw table as pandas reads it, columns in any order, and
    # predicts prices: its R² on the test rows is the run's.
    frame = pq.read_table(prices).to_pandas()
    rest, test = train_test_split(np.arange(len(frame)), test_size=0.2, random_state=0)
    rows = frame.iloc[test]
    mlflow.set_tracking_uri(store)
    served = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    predicted = np.asarray(served.predict(rows.drop(columns=["price"])[["rooms", "c3", "c2", "c1", "c0"]])).ravel()
    assert r2_score(rows["price"], predicted) == pytest.approx(result.metrics["test_r2"], abs=1e-4)

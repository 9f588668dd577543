"""Tables are standardised by their training split (`data.standardize`), and the logged model
takes their raw columns."""
import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import run_cli, small_run
from sklearn.linear_model import LogisticRegression

import pipelines
from pipelines import data
from pipelines.config import DataSection

SCALES = [1e-3, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5]


@pytest.fixture
def unscaled(tmp_path):
    """A linearly separable-ish table whose columns differ in scale by 10^8 and sit far from 0."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1500, len(SCALES)))
    label = (z @ rng.normal(size=len(SCALES)) + 0.3 * rng.normal(size=1500) > 0).astype(np.int64)
    columns = {f"c{i}": z[:, i] * s + 3 * s for i, s in enumerate(SCALES)}
    path = tmp_path / "unscaled.parquet"
    pq.write_table(pa.table({**columns, "label": label}), path)
    return path


def test_statistics_come_from_the_training_split_only(unscaled):
    split = data.load(DataSection(source=str(unscaled)))
    # standardised values are O(1), each within a few u (2**-24) of exact after float32 rounding
    torch.testing.assert_close(split.x_train.mean(dim=0), torch.zeros(len(SCALES)), atol=1e-5, rtol=0)
    torch.testing.assert_close(split.x_train.std(dim=0, unbiased=False), torch.ones(len(SCALES)),
                               atol=1e-4, rtol=0)
    assert not torch.allclose(split.x_test.mean(dim=0), torch.zeros(len(SCALES)), atol=1e-5)
    raw = data.load(DataSection(source=str(unscaled), standardize=False))
    assert raw.feature_mean is None and float(raw.x_train.abs().max()) > 1e5
    # (x - m) / s * s + m in float32: four roundings, each within u = 2**-24 of a value no larger
    # than |x| + |m|, so the round trip is within 4 u (|x| + |m|) of x (8 u allowed: s's own rounding).
    back = split.x_test * split.feature_std + split.feature_mean
    bound = 8 * 2.0 ** -24 * (raw.x_test.abs() + split.feature_mean.abs())
    assert bool(((back - raw.x_test).abs() <= bound).all()), float(((back - raw.x_test).abs() / bound).max())
    assert data.load(DataSection()).feature_mean is None  # digits keep their pixels


@pytest.mark.slow  # trains to an accuracy bar: seconds of training
def test_an_unscaled_table_trains_to_a_scaled_linear_models_accuracy(unscaled, store):
    split = data.load(DataSection(source=str(unscaled)))
    linear = LogisticRegression(max_iter=1000).fit(split.x_train.numpy(), split.y_train.numpy())
    reference = linear.score(split.x_test.numpy(), split.y_test.numpy())
    result = pipelines.train(small_run(**{"tracking.uri": store, "data.source": str(unscaled),
                                          "optim.epochs": 10, "tracking.log_model": True}))
    # 300 test rows: one accuracy's standard error is about 0.01 at these rates
    assert result.metrics["test_accuracy"] >= reference - 0.02, (result.metrics, reference)
    raw = data.load(DataSection(source=str(unscaled), standardize=False))
    mlflow.set_tracking_uri(store)
    logged = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    predicted = logged(raw.x_test).argmax(dim=1)
    assert float((predicted == raw.y_test).float().mean()) == pytest.approx(result.metrics["test_accuracy"])
    torch.testing.assert_close(logged(raw.x_test), result.model(raw.x_test))
    # pyfunc takes a raw DataFrame of the table (float64 columns, by name in any order)
    frame = pq.read_table(unscaled).to_pandas().drop(columns=["label"])
    served = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model").predict(frame[frame.columns[::-1]])
    torch.testing.assert_close(torch.as_tensor(served.to_numpy()),
                               result.model(torch.from_numpy(frame.to_numpy(np.float32))))


@pytest.mark.slow  # trains, logs the model and loads it back: seconds
def test_a_run_given_its_own_validation_and_test_tables_tests_on_them(tmp_path, store):
    """`raydeep run --data T --val-data V --test-data S`: the logged test accuracy is the
    model's on S's raw rows, and the run records where each split came from."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=len(SCALES))
    paths = {}
    for name, rows in (("train", 900), ("val", 200), ("test", 300)):
        z = rng.normal(size=(rows, len(SCALES)))
        label = (z @ w + 0.3 * rng.normal(size=rows) > 0).astype(np.int64)
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({**{f"c{i}": z[:, i] * s + 3 * s for i, s in enumerate(SCALES)},
                                 "label": label}), paths[name])
    result = run_cli("run", "--strategy", "local", "--epochs", "5", "--data", str(paths["train"]),
                     "--val-data", str(paths["val"]), "--test-data", str(paths["test"]),
                     "--tracking-uri", store, "--run-name", "own-splits", "--set", "tracking.figures=false",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    mlflow.set_tracking_uri(store)
    run = mlflow.search_runs(experiment_names=["raydeep"], output_format="list")[0]
    assert run.data.params["data.test_source"] == str(paths["test"])
    assert run.data.params["data.val_source"] == str(paths["val"])
    table = pq.read_table(paths["test"])
    x = torch.from_numpy(table.drop(["label"]).to_pandas().to_numpy(np.float32).copy())
    y = torch.tensor(table.column("label").to_pylist())
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")  # takes raw columns
    accuracy = float((logged(x).argmax(dim=1) == y).float().mean())
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])
    # and it learned: against a scaled logistic regression fitted on the same training file,
    # within 3 standard errors of a 300-row accuracy (sqrt(0.25 / 300) = 0.029 at most)
    train = data.load(DataSection(source=str(paths["train"]), test_source=str(paths["test"])))
    linear = LogisticRegression(max_iter=1000).fit(train.x_train.numpy(), train.y_train.numpy())
    reference = linear.score(train.x_test.numpy(), train.y_test.numpy())
    assert accuracy >= reference - 3 * (0.25 / len(y)) ** 0.5, (accuracy, reference)

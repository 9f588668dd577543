"""Tier 1: data sets, real Parquet and CSV files, and the batch plan shared by strategies."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import config, data
from pipelines.config import ConfigError, DataSection
from pipelines.data import DataError
from pipelines.training.loop import batch_indices


def test_digits_is_scaled_split_and_reproducible():
    a = data.load(DataSection(), seed=0)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    total = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert total == 1797 and len(a.y_test) == 360
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    # stratified: every class keeps its share of the test split
    counts = np.bincount(a.y_test.numpy(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    b = data.load(DataSection(), seed=0)
    torch.testing.assert_close(a.x_test, b.x_test)
    c = data.load(DataSection(), seed=1)
    assert not torch.equal(a.y_test, c.y_test)


def _table(n=120, features=6, seed=0):
    rng = np.random.default_rng(seed)
    columns = {f"f{i}": rng.normal(size=n) for i in range(features)}
    columns["label"] = rng.integers(0, 3, size=n)
    return pa.table(columns)


def test_parquet_columns_and_input_shape(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(_table(features=6), path)
    loaded = data.load(DataSection(source=str(path), batch_size=8, input_shape=[2, 3]))
    assert loaded.input_shape == (2, 3) and loaded.num_classes == 3
    assert len(loaded.y_train) + len(loaded.y_val) + len(loaded.y_test) == 120


def test_parquet_list_column_and_string_labels(tmp_path):
    path = tmp_path / "seq.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({
        "pixels": [rng.random(16).tolist() for _ in range(60)],
        "digit": ["a", "b", "c"] * 20,
    }), path)
    loaded = data.load(DataSection(source=str(path), label="digit", batch_size=4, input_shape=[4, 4]))
    assert loaded.class_names == ["a", "b", "c"] and loaded.input_shape == (4, 4)


def test_csv(tmp_path):
    path = tmp_path / "train.csv"
    pacsv.write_csv(_table(features=4), path)
    loaded = data.load(DataSection(source=str(path), batch_size=8))
    assert loaded.input_shape == (4,)


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load(DataSection(source=str(tmp_path / "nope.parquet")))
    text = tmp_path / "notes.json"
    text.write_text("{}")
    with pytest.raises(DataError, match="is not Parquet"):
        data.load(DataSection(source=str(text)))
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        data.load(DataSection(source=str(fake)))
    good = tmp_path / "good.parquet"
    pq.write_table(_table(), good)
    with pytest.raises(DataError, match="no label column 'target'"):
        data.load(DataSection(source=str(good), label="target"))
    with pytest.raises(DataError, match=r"input_shape \[5, 5\] holds 25 values .* has 6 features"):
        data.load(DataSection(source=str(good), input_shape=[5, 5], batch_size=8))
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(_table().append_column("city", pa.array(["x"] * 120)), mixed)
    with pytest.raises(DataError, match="non-numeric feature columns: city"):
        data.load(DataSection(source=str(mixed)))
    with pytest.raises(DataError, match=r"batch_size \(4096\) exceeds the training split"):
        data.load(DataSection(batch_size=4096))


def test_synthetic_has_the_asked_size_and_is_learnable():
    loaded = data.load(DataSection(source="synthetic", synthetic_samples=1000,
                                   synthetic_shape=[3, 4, 4], synthetic_classes=5))
    assert loaded.input_shape == (3, 4, 4) and loaded.num_classes == 5
    # nearest class mean on train separates the test split well: the classes are real
    means = torch.stack([loaded.x_train[loaded.y_train == k].mean(0) for k in range(5)])
    distance = ((loaded.x_test[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (distance.argmin(1) == loaded.y_test).float().mean() > 0.9


def test_worker_shards_are_disjoint_and_form_the_global_batch():
    kwargs = dict(seed=3, epoch=2)
    single = list(batch_indices(103, 12, **kwargs))
    shards = [list(batch_indices(103, 12, rank=r, world=3, **kwargs)) for r in range(3)]
    assert len(single) == 8 and all(len(s) == 8 for s in shards)
    for step, whole in enumerate(single):
        parts = [s[step] for s in shards]
        assert all(len(p) == 4 for p in parts)
        joined = torch.cat(parts)
        assert len(set(joined.tolist())) == 12
        assert sorted(joined.tolist()) == sorted(whole.tolist())
    other_epoch = list(batch_indices(103, 12, seed=3, epoch=3))
    assert not torch.equal(other_epoch[0], single[0])
    assert len(list(batch_indices(103, 12, seed=3, epoch=2, cap=2))) == 2


def _labelled(rows: int, seed: int, classes=(0, 1, 2), columns=("f0", "f1", "f2")):
    rng = np.random.default_rng(seed)
    table = {name: rng.normal(loc=10 * i, scale=i + 1, size=rows) for i, name in enumerate(columns)}
    return pa.table({**table, "label": rng.choice(list(classes), size=rows)})


def test_explicit_validation_and_test_tables_are_the_splits_and_train_sets_the_scale(tmp_path):
    """`data.val_source`/`data.test_source` (`--val-data`/`--test-data`): each split is its
    own table's rows, in its order; the classes and the standardisation are the training table's."""
    paths = {name: tmp_path / f"{name}.parquet" for name in ("train", "val", "test")}
    pq.write_table(_labelled(90, 0), paths["train"])
    pq.write_table(_labelled(30, 1), paths["val"])
    pq.write_table(_labelled(25, 2, classes=(2, 0)), paths["test"])  # a test table may lack a class
    section = DataSection(source=str(paths["train"]), val_source=str(paths["val"]),
                          test_source=str(paths["test"]), batch_size=8)
    raw = data.load(dataclasses.replace(section, standardize=False))
    for split, name in ((raw.x_train, "train"), (raw.x_val, "val"), (raw.x_test, "test")):
        expected = pq.read_table(paths[name]).drop(["label"]).to_pandas().to_numpy(np.float32).copy()
        assert torch.equal(split, torch.from_numpy(expected)), name
    expected_labels = pq.read_table(paths["test"]).column("label").to_pylist()
    assert raw.class_names == ["0", "1", "2"] and raw.y_test.tolist() == expected_labels
    scaled = data.load(section)
    train = raw.x_train.double()
    torch.testing.assert_close(scaled.feature_mean, train.mean(dim=0).float())
    torch.testing.assert_close(scaled.feature_std, train.std(dim=0, unbiased=False).float())
    # only the test table given: validation is drawn from the training table, as without one
    alone = data.load(dataclasses.replace(section, val_source=None, standardize=False))
    assert torch.equal(alone.x_test, raw.x_test) and len(alone.y_train) + len(alone.y_val) == 90
    assert len(alone.y_val) == 9  # val_fraction 0.1 of the 90 training rows


def test_held_out_tables_that_do_not_fit_the_training_table_say_why(tmp_path):
    train = tmp_path / "train.parquet"
    pq.write_table(_labelled(60, 0), train)
    unseen = tmp_path / "unseen.parquet"
    pq.write_table(_labelled(20, 1, classes=(1, 7)), unseen)
    with pytest.raises(DataError, match=r"data.test_source .*unseen.parquet': label column 'label' holds 7, "
                                        r"which the training data .* does not"):
        data.load(DataSection(source=str(train), test_source=str(unseen), batch_size=8))
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(_labelled(20, 1, columns=("f0", "f1", "g2")), renamed)
    with pytest.raises(DataError, match=r"data.val_source .* has feature columns f0, f1, g2, but data.source "
                                        r".* has f0, f1, f2: both must hold the same features"):
        data.load(DataSection(source=str(train), val_source=str(renamed), batch_size=8))
    with pytest.raises(ConfigError, match=r"^data.test_source must not be empty"):
        config.load(overrides={"data.source": str(train), "data.test_source": " "})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^data directory .*empty' holds no Parquet"):
        data.load(DataSection(source=str(train), val_source=str(tmp_path / "empty"), batch_size=8))
    with pytest.raises(DataError, match=r"^data.test_source '.*nothing-\*.csv' matches no Parquet or CSV file"):
        data.load(DataSection(source=str(train), test_source=str(tmp_path / "nothing-*.csv"), batch_size=8))

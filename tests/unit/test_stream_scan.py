"""A streamed table's driver-side pass (`pipelines.streaming`): its hash split, statistics
and held-out rows are what a whole-table read of the same rows gives. (Training through
Ray Data: tests/strategies/test_streaming.py.)"""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import data, registry, row_split, streaming
from pipelines.config import DataSection, load
from pipelines.errors import DataError


def write_parts(root, frame: dict, parts: int, csv: bool = False):
    """`frame`'s rows split over `parts` files of a directory, in row order."""
    import pyarrow.csv as pacsv

    root.mkdir()
    table = pa.table(frame)
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = table.slice(a, b - a)
        if csv:
            pacsv.write_csv(part, root / f"part-{i}.csv")
        else:
            pq.write_table(part, root / f"part-{i}.parquet", row_group_size=97)
    return root


@pytest.fixture
def shifted(tmp_path):
    """Columns far from zero (1e6 + O(1)), a string label, 3,000 rows over 5 files."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 4)) * [1.0, 10.0, 0.1, 3.0] + [1e6, -5e3, 7.0, 0.0]
    label = np.where(x[:, 1] + 5e3 + 10 * rng.normal(size=3000) > 0, "up", "down")
    return write_parts(tmp_path / "shifted", {**{f"c{i}": x[:, i] for i in range(4)}, "label": label}, 5)


def test_a_rows_split_depends_on_its_values_only_and_meets_the_fractions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3)).astype(np.float32)
    labels = list(rng.integers(0, 5, size=20_000))
    which = row_split.split_of(x, labels, 0.2, 0.1)
    order = rng.permutation(len(x))
    assert np.array_equal(row_split.split_of(x[order], [labels[i] for i in order], 0.2, 0.1), which[order])
    n = len(x)
    for k, p in ((2, 0.2), (1, 0.8 * 0.1), (0, 0.8 * 0.9)):
        # a binomial count: within 5 standard deviations of its mean, with room to spare
        assert abs((which == k).sum() - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, (k, (which == k).sum())
    twins = row_split.split_of(np.repeat(x[:50], 2, axis=0), [v for v in labels[:50] for _ in (0, 1)], 0.2, 0.1)
    assert np.array_equal(twins[0::2], twins[1::2])  # a duplicated row lands beside its twin
    assert (row_split.split_of(x, labels, 0.0, 0.0) == 0).all()


def test_a_workers_part_of_the_rows_is_balanced_and_independent_of_the_split():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30_000, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=30_000)
    which, part = row_split.split_of(x, labels, 0.2, 0.1), row_split.part_of(x, labels, 3)
    assert set(np.unique(part)) == {0, 1, 2}
    order = rng.permutation(len(x))
    assert np.array_equal(row_split.part_of(x[order], labels[order], 3), part[order])  # values only
    for k in (0, 1, 2):  # each split spread evenly over the parts: binomial counts within 5 sd
        for split in (0, 2):
            n = (which == split).sum()
            assert abs(((which == split) & (part == k)).sum() - n / 3) <= 5 * (n * 2 / 9) ** 0.5, (k, split)


def test_moments_combined_batch_by_batch_are_the_whole_arrays():
    rng = np.random.default_rng(1)
    x = 1e6 + rng.normal(size=(10_000, 3))
    moments = streaming.Moments()
    for a, b in ((0, 1), (1, 777), (777, 5000), (5000, 10_000)):
        moments.add(x[a:b])
    # float64, pairwise: relative errors of a few u (1e-16) times log2 of the batch count
    np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(moments.std(), x.std(axis=0), rtol=1e-9)  # squares of O(1) deviations


@pytest.mark.parametrize("csv", [False, True], ids=["parquet", "csv"])
def test_a_streamed_scan_gives_the_whole_reads_statistics_classes_and_held_out_rows(shifted, tmp_path, csv):
    source = shifted
    if csv:
        source = write_parts(tmp_path / "csv", pq.read_table(sorted(shifted.glob("*.parquet"))).to_pydict(), 3, csv=True)
    streamed = data.load(DataSection(source=str(source), stream=True))
    whole = pq.read_table(sorted(shifted.glob("*.parquet")))
    x = np.stack([whole.column(f"c{i}").to_numpy() for i in range(4)], axis=1).astype(np.float32)
    labels = whole.column("label").to_pylist()
    which = row_split.split_of(x, labels, 0.2, 0.1)
    assert streamed.stream.rows == (which == 0).sum() and streamed.x_train.shape == (0, 4)
    assert streamed.class_names == ["down", "up"] and streamed.task == "classification"
    train = x[which == 0].astype(np.float64)
    torch.testing.assert_close(streamed.feature_mean, torch.from_numpy(train.mean(axis=0).astype(np.float32)))
    torch.testing.assert_close(streamed.feature_std, torch.from_numpy(train.std(axis=0).astype(np.float32)))
    for k, (xs, ys) in ((1, (streamed.x_val, streamed.y_val)), (2, (streamed.x_test, streamed.y_test))):
        rows = which == k
        expected = (x[rows] - streamed.feature_mean.numpy()) / streamed.feature_std.numpy()
        torch.testing.assert_close(xs, torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=0)
        assert ys.tolist() == [["down", "up"].index(v) for v, r in zip(labels, rows) if r]


def test_a_streamed_float_label_is_a_target_with_the_training_rows_scale(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 3))
    root = write_parts(tmp_path / "t", {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": 300 + 40 * x[:, 0]}, 4)
    streamed = data.load(DataSection(source=str(root), stream=True))
    y = (300 + 40 * x[:, 0]).astype(np.float32)
    which = row_split.split_of(x.astype(np.float32), list(300 + 40 * x[:, 0]), 0.2, 0.1)
    assert streamed.task == "regression" and streamed.num_outputs == 1
    assert streamed.target_mean == pytest.approx(y[which == 0].astype(np.float64).mean(), rel=1e-12)
    assert streamed.target_std == pytest.approx(y[which == 0].astype(np.float64).std(), rel=1e-9)
    assert streamed.y_test.tolist() == y[which == 2].tolist()


def test_what_cannot_stream_is_refused_in_one_line(shifted, tmp_path, monkeypatch):
    with pytest.raises(Exception, match="data.stream needs data.source to be a table"):
        load(overrides={"data.stream": True})
    # Every built-in strategy streams; a user's registered strategy may read from memory only.
    monkeypatch.setattr(registry.get("diloco"), "streams", False)
    with pytest.raises(Exception, match="data.stream works under allreduce, lbfgs, local, pipeline and ps; "
                                        "diloco reads"):
        load(overrides={"data.stream": True, "data.source": str(shifted), "strategy.name": "diloco"})
    monkeypatch.undo()
    assert load(overrides={"data.stream": True, "data.source": str(shifted), "strategy.name": "diloco"}).data.stream
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"a": pa.array([], pa.float64()), "label": pa.array([], pa.int64())}), empty / "a.parquet")
    with pytest.raises(DataError, match="has no rows"):
        data.load(DataSection(source=str(empty), stream=True))
    import pipelines

    with pytest.raises(Exception, match="table= takes a ray.data.Dataset of the table's columns, got list"):
        pipelines.train(load(overrides={"strategy.name": "local"}), table=[1, 2])
    run = load(overrides={"data.stream": True, "data.source": str(shifted), "resources.workers": 2})
    bundles = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert streaming.data_shortfall(run, bundles, {"CPU": 3.0}) is None
    assert streaming.data_shortfall(run, bundles, {"CPU": 2.0}) == (
        "data.stream: Ray Data needs 1 CPU beside the 2 of the run's actors, and the Ray cluster has 2: "
        "lower resources.workers or cpus_per_worker, or add a node")


def test_the_fast_hash_and_feature_view_equal_their_plain_definitions():
    """The column-major feature view and the hash over contiguous words give the bits of the
    plain row-major definitions (a user's split must not move with the layout)."""
    from pipelines import rows

    rng = np.random.default_rng(3)
    n = 1000
    columns = {"a": rng.normal(size=n).astype(np.float32), "b": rng.normal(size=n) * 1e3,
               "c": rng.integers(-500, 500, n), "label": rng.integers(0, 10, n)}
    batch = pa.table(columns)
    names = ["a", "b", "c"]
    plain = np.stack([columns[c] for c in names], axis=1).astype(np.float32)
    view = rows.feature_view("t", batch, names)
    assert np.array_equal(view, plain) and np.array_equal(rows.features("t", batch, names), plain)
    import pandas as pd

    def plain_hash(x, labels):  # FNV-1a row by row over the row-major words, SplitMix64's finaliser
        words = np.ascontiguousarray(x.reshape(len(x), -1)).view(np.uint32).astype(np.uint64)
        h = np.full(len(x), 0xCBF29CE484222325, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(words.shape[1]):
                h = (h ^ words[:, j]) * np.uint64(0x100000001B3)
            h ^= pd.util.hash_array(np.asarray(labels)).astype(np.uint64)
            for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
                h ^= h >> np.uint64(shift)
                h *= np.uint64(factor)
            h ^= h >> np.uint64(31)
        return h

    labels = columns["label"]
    for x in (plain, view, plain.reshape(n, 3, 1)):
        assert np.array_equal(row_split.row_hash(x, labels), plain_hash(plain, labels))


def test_a_ray_data_task_prepares_its_batches_without_importing_torch(shifted, tmp_path):
    # A read task's process only turns raw rows into arrays: importing torch there (the
    # run config brings it with the models) cost each of Ray Data's fresh workers about a
    # second of CPU before its first block. A fresh interpreter unpickles the task's
    # function as Ray Data would, prepares a file's batch and reports the imports.
    import pickle
    import subprocess
    import sys

    prepare = streaming._Prepare(data.load(DataSection(source=str(shifted), stream=True)).stream)
    (tmp_path / "prepare.pkl").write_bytes(pickle.dumps(prepare))
    probe = f"""
import pickle, sys
import pyarrow.parquet as pq
prepare = pickle.loads(open({str(tmp_path / "prepare.pkl")!r}, "rb").read())
out = prepare(pq.read_table({str(sorted(shifted.glob("*.parquet"))[0])!r}))
assert out["x"].shape[1] == 4 and len(out["x"]) == len(out["y"]) > 0
print("torch" in sys.modules, "pipelines.config" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]

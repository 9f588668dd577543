"""Table sources (`pipelines.tables`): a file, a directory or a glob of Parquet/CSV files, read
as one table, and what is refused in one line. The same on an object store is in
tests/system/test_object_store.py."""
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipelines import data, tables
from pipelines.config import DataSection
from pipelines.tables import DataError


def part(rows: range, **extra) -> pa.Table:
    x = np.arange(rows.start, rows.stop, dtype=np.float64)
    return pa.table({"a": x, "b": x * 2, "label": (x.astype(np.int64) % 2), **extra})


@pytest.fixture
def parts(tmp_path):
    """A table of 30 rows in three Parquet files, with the marker and hidden files writers leave."""
    root = tmp_path / "table"
    (root / "rest").mkdir(parents=True)
    pq.write_table(part(range(0, 10)), root / "part-0.parquet")
    pq.write_table(part(range(10, 20)), root / "part-1.parquet")
    pq.write_table(part(range(20, 30)), root / "rest" / "part-2.parquet")
    (root / "_SUCCESS").write_text("")
    (root / ".part-0.parquet.crc").write_text("x")
    return root


def test_a_directory_is_its_files_in_name_order_and_a_glob_those_it_matches(parts):
    whole = tables.read(str(parts))
    assert whole.num_rows == 30 and whole.column("a").to_pylist() == list(range(30))
    top = tables.read(str(parts / "part-*.parquet"))  # `*` stays in its directory
    assert top.column("a").to_pylist() == list(range(20))
    deep = tables.read(str(parts / "**" / "*.parquet"))
    assert deep.num_rows == 30
    one = tables.read(str(parts / "part-1.parquet"))
    assert one.column("a").to_pylist() == list(range(10, 20))


def test_a_directory_trains_on_the_same_rows_as_one_file_of_them(parts, tmp_path):
    pq.write_table(tables.read(str(parts)), tmp_path / "whole.parquet")
    section = DataSection(source=str(parts), batch_size=4)
    split, reference = data.load(section), data.load(DataSection(source=str(tmp_path / "whole.parquet"),
                                                                 batch_size=4))
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(split, name).numpy(), getattr(reference, name).numpy()), name


def test_csv_files_of_a_directory_are_one_table(tmp_path):
    (tmp_path / "csv").mkdir()
    pacsv.write_csv(part(range(0, 6)), tmp_path / "csv" / "a.csv")
    pacsv.write_csv(part(range(6, 12)), tmp_path / "csv" / "b.csv")
    assert tables.read(str(tmp_path / "csv")).column("a").to_pylist() == list(range(12))


@pytest.mark.parametrize("make, source, message", [
    (lambda r: (r / "empty").mkdir(), "empty", "data directory '{root}/empty' holds no Parquet (.parquet) or CSV"),
    (lambda r: None, "nothing-*.parquet", "data.source '{root}/nothing-*.parquet' matches no Parquet or CSV file"),
    (lambda r: None, "absent", "data file '{root}/absent' does not exist"),
    (lambda r: ((r / "mixed").mkdir(), pq.write_table(part(range(4)), r / "mixed" / "a.parquet"),
                pacsv.write_csv(part(range(4)), r / "mixed" / "b.csv")),
     "mixed", "mixes Parquet and CSV files; give one format"),
    (lambda r: ((r / "odd").mkdir(), pq.write_table(part(range(4)), r / "odd" / "a.parquet"),
                (r / "odd" / "notes.json").write_text("{}")),
     "odd", "data file '{root}/odd/notes.json' is not Parquet (.parquet) or CSV (.csv)"),
    (lambda r: ((r / "nolabel").mkdir(), pq.write_table(part(range(4)), r / "nolabel" / "a.parquet"),
                pq.write_table(part(range(4)).drop(["label"]), r / "nolabel" / "b.parquet")),
     "nolabel", "data file '{root}/nolabel/b.parquet' lacks column(s) label (unlike '{root}/nolabel/a.parquet')"),
    (lambda r: ((r / "extra").mkdir(), pq.write_table(part(range(4)), r / "extra" / "a.parquet"),
                pq.write_table(part(range(4), c=np.zeros(4)), r / "extra" / "b.parquet")),
     "extra", "data file '{root}/extra/b.parquet' has column(s) c the others lack"),
    (lambda r: ((r / "types").mkdir(), pq.write_table(part(range(4)), r / "types" / "a.parquet"),
                pq.write_table(part(range(4)).set_column(0, "a", pa.array(["x"] * 4)), r / "types" / "b.parquet")),
     "types", "data file '{root}/types/b.parquet': column 'a' holds string, but double in '{root}/types/a.parquet'"),
    (lambda r: ((r / "broken").mkdir(), (r / "broken" / "a.parquet").write_bytes(b"not parquet")),
     "broken", "data file '{root}/broken/a.parquet' is not a readable Parquet file"),
], ids=["empty", "no-match", "absent", "mixed", "odd-file", "label-missing", "extra-column", "types", "broken"])
def test_a_table_that_cannot_be_one_is_refused_in_one_line(tmp_path, make, source, message):
    make(tmp_path)
    with pytest.raises(DataError) as refused:
        tables.read(str(tmp_path / source))
    text = str(refused.value)
    assert "\n" not in text and message.format(root=tmp_path) in text, text

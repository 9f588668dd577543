"""A new SQLite store seeded from the cached empty one is the store MLflow would have made."""
from __future__ import annotations

import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from pipelines import sqlite_store
from pipelines.tracking import _client


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(sqlite_store.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _schema(path) -> tuple[list, list]:
    """Every table and index, with the lines of its SQL sorted: MLflow's own migrations
    write a table's constraints in an order that varies from one build to the next."""
    with sqlite3.connect(path) as db:
        objects = sorted((kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                         for kind, name, sql in db.execute("SELECT type, name, sql FROM sqlite_master"))
        return objects, db.execute("SELECT version_num FROM alembic_version").fetchall()


def test_a_seeded_store_is_the_one_mlflow_builds(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = tmp_path / "built.db"
    MlflowClient(tracking_uri=f"sqlite:///{built}").search_experiments()  # MLflow's own migrations
    seeded = tmp_path / "seeded.db"
    assert sqlite_store.seed(seeded) and (cache / next(cache.iterdir()).name).is_file()

    client = _client(f"sqlite:///{seeded}")
    default = client.get_experiment("0")
    assert _schema(seeded) == _schema(built)
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "mlruns" / "0")
    run = client.create_run(client.create_experiment("seeded")).info.run_id
    client.log_metric(run, "loss", 0.5, step=3)
    assert [(m.step, m.value) for m in client.get_metric_history(run, "loss")] == [(3, 0.5)]


def test_a_store_that_exists_is_never_replaced(tmp_path, cache):
    store = tmp_path / "mlflow.db"
    _client(f"sqlite:///{store}").create_experiment("kept")
    assert not sqlite_store.seed(store)
    assert _client(f"sqlite:///{store}").get_experiment_by_name("kept") is not None


def test_without_a_usable_cache_mlflow_builds_the_store_itself(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv(sqlite_store.CACHE_ENV, str(blocked / "cache"))
    store = tmp_path / "mlflow.db"
    assert not sqlite_store.seed(store) and not store.exists()
    assert _client(f"sqlite:///{store}").get_experiment("0").name == "Default"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mlflow.db.")] == []

"""The start-up timeline without Ray: `pipelines.startup`, the tracker's marks, a local run."""
import time

import pytest
from helpers import small_run
from mlflow.tracking import MlflowClient

import pipelines
from pipelines import startup
from pipelines.tracking import Tracker


@pytest.fixture(autouse=True)
def no_launch():
    startup.forget()
    yield
    startup.forget()


def metrics(store: str, run_id: str) -> dict[str, float]:
    return MlflowClient(store).get_run(run_id).data.metrics


def test_launch_time_is_recorded_once_and_launched_overrides_it():
    first = startup.launch_time()
    assert abs(first - time.time()) < 1
    assert startup.launch_time() == first
    startup.launched(first - 30)
    assert startup.launch_time() == first - 30
    startup.forget()
    assert startup.launch_time() > first - 1


def test_marks_are_seconds_since_launch_in_order():
    now = time.time()
    startup.launched(now - 10)
    startup.mark("ray_ready")
    startup.mark("data")
    marks = startup.marks()
    assert list(marks) == ["ray_ready", "data"]
    assert 10 <= marks["ray_ready"] <= marks["data"] < 11
    startup.launched(now - 20)  # a later launch moves every mark with it
    assert 20 <= startup.marks()["ray_ready"] < 21


def test_tracker_logs_marks_and_first_step_from_its_launch(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker.start(store, "startup", "marks", {})
    tracker.launched_at = time.time() - 5
    tracker.startup("placement")
    tracker.startup("actors_ready", at=tracker.launched_at + 6.5)
    assert tracker.first_step(at=tracker.launched_at + 7) == pytest.approx(7)
    logged = metrics(store, tracker.run_id)
    assert 5 <= logged["startup_placement_s"] < 6
    assert logged["startup_actors_ready_s"] == pytest.approx(6.5)
    assert logged["time_to_first_step_s"] == logged["startup_first_step_s"] == pytest.approx(7)
    steps = {m.step for m in MlflowClient(store).get_metric_history(tracker.run_id, "startup_placement_s")}
    assert steps == {0}


def test_tracker_without_a_launch_logs_no_timeline(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker.start(store, "startup", "none", {})
    tracker.startup("placement")
    assert tracker.first_step() is None
    assert not any(k.startswith("startup_") or k == "time_to_first_step_s"
                   for k in metrics(store, tracker.run_id))


def test_a_local_run_reports_its_time_to_first_step(store):
    launched = time.time() - 3  # as the CLI records its process's start
    startup.launched(launched)
    startup.mark("ray_ready")
    result = pipelines.train(small_run(**{"tracking.uri": store}))
    assert result.metrics["time_to_first_step_s"] > 3
    logged = metrics(store, result.run_id)
    assert logged["startup_first_step_s"] == pytest.approx(result.metrics["time_to_first_step_s"])
    assert 3 <= logged["startup_ray_ready_s"] <= logged["startup_run_open_s"] <= logged["startup_first_step_s"]
    assert startup.launch_time() > launched + 3  # the next run in this process starts afresh


def test_a_python_run_is_measured_from_its_own_call(store):
    began = time.time()
    result = pipelines.train(small_run(**{"tracking.uri": store, "optim.steps_per_epoch": 1}))
    assert 0 < result.metrics["time_to_first_step_s"] < time.time() - began
    assert "startup_first_step_s" in metrics(store, result.run_id)

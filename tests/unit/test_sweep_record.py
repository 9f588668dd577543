"""A sweep's MLflow record (`pipelines.sweep.record`) on a real SQLite store."""
from mlflow.tracking import MlflowClient

from pipelines.sweep.record import SweepRecord
from pipelines.tracking import Tracker


def test_a_trial_killed_before_logging_its_params_gets_them_when_it_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = SweepRecord.start(uri, "raydeep", "sweep-1", {"samples": 3})
    params = {"optim.lr": 0.004, "model.width": 64}
    # As a SIGKILL between MLflow's create_run and the params' write leaves it: a child with
    # its tags and no params.
    bare = Tracker.start(uri, "raydeep", "trial_1", {}, tags={
        "mlflow.parentRunId": record.parent.run_id, "raydeep.trial_id": "t1", "raydeep.sweep": "sweep-1"})
    Tracker(uri, bare.run_id, bare.experiment_id).log_params({"model.width": 64})  # one of the chunks got there
    again = record.child("t1", "trial_1", params, {}, epochs=2)
    assert again.run_id == bare.run_id  # the same child, not a second one
    assert MlflowClient(uri).get_run(bare.run_id).data.params == {"optim.lr": "0.004", "model.width": "64"}
    assert record.child("t1", "trial_1", params, {}, epochs=2).run_id == bare.run_id  # and again: nothing to add

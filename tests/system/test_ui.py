"""`raydeep ui` serves the run store over HTTP: a real `mlflow server` process."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import REPO, free_port, small_run

import pipelines

pytestmark = pytest.mark.slow  # a real `mlflow server` process




def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_ui_serves_the_runs_over_the_rest_api(workdir, store):
    result = pipelines.train(small_run(**{"tracking.uri": store, "optim.epochs": 1,
                                          "tracking.run_name": "shown"}))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "ui", "--tracking-uri", "sqlite:///mlflow.db",
         "--port", str(port)], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={result.run_id}"
        deadline, body = time.time() + 120, None
        while time.time() < deadline and server.poll() is None:
            try:
                body = _get(url)
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, f"the UI never answered on port {port}"
        run = body["run"]
        assert run["info"]["run_name"] == "shown" and run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["test_accuracy"] == result.metrics["test_accuracy"]
        # The experiment opens on its runs table (model training), not MLflow 3's GenAI overview,
        # and `raydeep ui` prints where that table is.
        experiment_id = run["info"]["experiment_id"]
        experiment = _get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get"
                          f"?experiment_id={experiment_id}")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        printed = [server.stdout.readline().decode() for _ in range(2)]
        assert f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs" in printed[1], printed
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

"""`raydeep ui`: the MLflow UI (an `mlflow server` process) over the run store."""
from __future__ import annotations

import os
import subprocess
import sys


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    from pipelines.tracking import absolute_uri

    uri = absolute_uri(tracking_uri)
    # One worker process: a UI for one person browsing runs; MLflow's default of 4 means
    # four processes importing MLflow before the first page (seconds each on 2 cores).
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def newest_experiment(uri: str) -> tuple[str, str] | None:
    """(id, name) of the experiment with the newest run (else the newest experiment), or
    None for an empty store or one that cannot be read (the server will say why)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiments = client.search_experiments(order_by=["creation_time DESC"])
        if not experiments:
            return None
        newest = client.search_runs([e.experiment_id for e in experiments],
                                    order_by=["attributes.start_time DESC"], max_results=1)
        chosen = newest[0].info.experiment_id if newest else experiments[0].experiment_id
        return chosen, next(e.name for e in experiments if e.experiment_id == chosen)
    except Exception:  # noqa: BLE001 - a hint only; `mlflow server` reports store errors itself
        return None


def serve(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow server in the foreground until interrupted."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"raydeep: warning: the MLflow UI on {host} is reachable from other machines "
              "and has no authentication", file=sys.stderr)
    try:
        command = server_command(tracking_uri, host, port)
    except ValueError as e:
        print(f"raydeep: error: {e}", file=sys.stderr)
        return 2
    address = f"http://{host}:{port}"
    print(f"MLflow UI on {address} over {command[5]} (Ctrl-C to stop)", flush=True)
    newest = newest_experiment(command[5])
    if newest is not None:
        print(f"  runs of experiment {newest[1]!r}: {address}/#/experiments/{newest[0]}/runs", flush=True)
    try:
        return subprocess.call(command, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0

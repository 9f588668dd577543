"""`raydeep ui`: the MLflow UI (an `mlflow server` process) over the run store."""
from __future__ import annotations

import os
import subprocess
import sys


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    from pipelines.tracking import absolute_uri

    uri = absolute_uri(tracking_uri)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port)]


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
    print(f"MLflow UI on http://{host}:{port} over {command[5]} (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(command, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0

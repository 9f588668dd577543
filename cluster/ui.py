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


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def address_problem(host: str, port: int, allow_remote: bool) -> str | None:
    """Why the UI cannot listen on `host:port`, in one line; None when it can."""
    import socket

    if not 1 <= port <= 65535:
        return f"--port must be in 1..65535, got {port}"
    if not host.strip():
        return "--host must not be empty (default: 127.0.0.1)"
    if host not in LOOPBACK and not allow_remote:
        return (f"--host {host} would let other machines read and write the runs (MLflow's server has "
                "no authentication): pass --allow-remote to mean it, or keep the default 127.0.0.1")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        return f"--host {host!r} is not an address of this machine ({e.strerror or e})"
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.bind(where)
    except OSError as e:
        return f"cannot listen on {host}:{port}: {e.strerror} (pick another --port or --host)"
    return None


def check_backend_store(tracking_uri: str) -> None:
    """A one-line error for a store `mlflow server` cannot serve, said before it starts: it
    would print a traceback (or, for a server's address, retry for minutes)."""
    from pipelines.config import ConfigError
    from pipelines.errors import redact
    from pipelines.tracking import check_store

    scheme = tracking_uri.partition("://")[0].lower()
    if "://" in tracking_uri and scheme in ("http", "https"):
        raise ConfigError(f"--tracking-uri {redact(tracking_uri)!r} is an MLflow server, not a store to "
                          "serve: open it in a browser, or give its store (e.g. sqlite:///mlflow.db)")
    if "://" in tracking_uri:
        check_store(tracking_uri)


def serve(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, allow_remote: bool = False) -> int:
    """Run the MLflow server in the foreground until interrupted."""
    try:  # the store first: its problem is the same on any address
        check_backend_store(tracking_uri)
        command = server_command(tracking_uri, host, port)
    except ValueError as e:  # ConfigError is one
        print(f"raydeep: error: {e}", file=sys.stderr)
        return 2
    problem = address_problem(host, port, allow_remote)
    if problem:
        print(f"raydeep: error: {problem}", file=sys.stderr)
        return 2
    if host not in LOOPBACK:
        print(f"raydeep: warning: the MLflow UI on {host} is reachable from other machines "
              "and has no authentication", file=sys.stderr)
    address = f"http://{host}:{port}"
    print(f"MLflow UI on {address} over {command[5]} (Ctrl-C to stop)", flush=True)
    newest = newest_experiment(command[5])
    if newest is not None:
        print(f"  runs of experiment {newest[1]!r}: {address}/#/experiments/{newest[0]}/runs", flush=True)
    try:
        code = subprocess.call(command, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0
    if code not in (0, -2, 130):  # not a Ctrl-C: the server failed, say so
        print(f"raydeep: error: the MLflow server exited with code {code} (its output is above)",
              file=sys.stderr)
        return 1
    return 0

"""Refuse run storage that only one node of a multi-node cluster can see.

On several nodes, Ray Train and Tune write checkpoints from whichever node a worker runs on
and read them back from another; a path on one machine's disk makes a restart fail minutes
later with a missing file. A SQLite MLflow store has the same problem (and SQLite over NFS
locks badly): workers log to a file that is not the driver's. So before training starts,
raydeep says so in one line.
"""
from __future__ import annotations

def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def shared_storage_problem(run_config, nodes: int | None = None) -> str | None:
    """The one-line reason `run_config` cannot run on this cluster's `nodes`, or None."""
    r, uri = run_config.resources, run_config.tracking.uri
    nodes = alive_nodes() if nodes is None else nodes
    if nodes <= 1:
        return None
    if not r.shared_storage:
        return (f"the cluster has {nodes} nodes but resources.storage_path {r.storage_path!r} is "
                "local to one of them: pass --storage-path with a path every node mounts (NFS) "
                "and --set resources.shared_storage=true")
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (f"the cluster has {nodes} nodes but tracking.uri {uri!r} is a file on one of them: "
                "run an MLflow tracking server (mlflow server --backend-store-uri ... --host 0.0.0.0) "
                "and pass --tracking-uri http://HOST:5000")
    return None

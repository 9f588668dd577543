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
    """The one-line reason `run_config` cannot run on this cluster's `nodes`, or None.

    `resources.shared_storage: true` vouches that the storage path (and a SQLite tracking
    file beside it) are on a filesystem every node mounts.
    """
    r, uri = run_config.resources, run_config.tracking.uri
    nodes = alive_nodes() if nodes is None else nodes
    if nodes <= 1 or r.shared_storage:
        return None
    local_tracking = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if "://" in r.storage_path:  # an object store: every node reaches it
        if not local_tracking:
            return None
        return (f"the cluster has {nodes} nodes but tracking.uri {uri!r} is local to one of them: "
                "track in an MLflow server (--tracking-uri http://HOST:5000)")
    what = (f"resources.storage_path {r.storage_path!r} and tracking.uri {uri!r} are"
            if local_tracking else f"resources.storage_path {r.storage_path!r} is")
    return (f"the cluster has {nodes} nodes but {what} local to one of them: keep runs on a path "
            "every node mounts (NFS) and pass --set resources.shared_storage=true"
            + ("; or track in an MLflow server (--tracking-uri http://HOST:5000)" if local_tracking else ""))

"""Connecting to Ray: an embedded local instance by default, or an existing cluster."""
from __future__ import annotations

import logging
import os
import socket


LOCAL_SYSTEM_CONFIG = {"max_direct_call_object_size": 1 << 20}
"""Ray settings of the embedded local Ray. Objects up to 1 MiB go inline in actor calls
instead of through the shared-memory object store: a parameter server's 340 KB push/pull
then takes 1.8 ms instead of 3.0 ms on 2 cores (measured). On a cluster, set it when
starting Ray: `ray start ... --system-config='{"max_direct_call_object_size": 1048576}'`."""


def quiet_ray_logs() -> None:
    """Keep the terminal to raydeep's own progress lines; Ray's logs stay in its log files."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a `host:port` nobody listens on: `ray.init` would retry for minutes."""
    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({e})") from None


def connect(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Start or join Ray once per process; returns the cluster's resources."""
    import ray

    quiet_ray_logs()
    # A Ray job's driver (`raydeep submit`) finds its cluster in RAY_ADDRESS; starting an
    # embedded Ray there would fail on `_system_config`, which only a new cluster takes.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and not ray.is_initialized():
        check_reachable(address)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, logging_level=logging.WARNING,
                     _system_config=LOCAL_SYSTEM_CONFIG)
    return ray.cluster_resources()

"""Shared fixtures: one Ray per test session with pinned CPUs, a fresh MLflow store per test.

Tests live in three tiers: `unit/` (no processes), `strategies/` (real Ray actors and worker
groups, checked against `local`), `system/` (the CLI, clusters, sweeps, stores, servers);
what they share besides fixtures is in `helpers.py`.
"""
from __future__ import annotations

import os
import sys

import pytest
from helpers import start_session_ray

# The suite starts hundreds of Python processes (Ray workers and actors, CLI runs, servers)
# that import torch, Ray and MLflow. Where PYTHONDONTWRITEBYTECODE is set (these machines set
# it) and the install wrote no bytecode (`pip install --no-compile`), each of them compiled
# every module from source: `import torch` 3.7 s instead of 2.1 s, test_allreduce.py 122 s
# instead of 63 s. Bytecode is written on first import instead, by this process and by every
# process it starts (they inherit the environment).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test models are tiny: on a 2-core machine shared with Ray workers, a second torch
    thread in the test process mostly waits."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once per pytest process. The suite runs on two processes
    (`-n 2 --dist loadfile`: a file's module fixtures stay in one), so two such Rays share
    the machine: nothing here may take a fixed port or a machine-wide file (clusters get
    free ports and a RAY_TMPDIR of their own)."""
    ray = start_session_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory: its own mlflow.db and raydeep_runs/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def store(workdir):
    return f"sqlite:///{workdir / 'mlflow.db'}"




HEAVIEST_FIRST = ("system/test_sweep.py", "strategies/test_param_server.py", "strategies/test_pipeline.py",
                  "system/test_cluster.py", "system/test_multinode.py", "system/test_object_store.py",
                  "strategies/test_lbfgs.py", "strategies/test_allreduce.py", "strategies/test_streaming.py",
                  "system/test_tracking_outage.py",
                  "system/test_cli.py", "system/test_bad_addresses.py", "strategies/test_user_models.py")
"""The files that took longest (1-5 minutes each on two pytest processes, 2026-12-03), longest
first. The suite runs them first, then `system/`, `strategies/` and `unit/` in that order:
the two processes (`--dist loadfile --no-loadscope-reorder`) take files in this order as they
free up, so the last files are short ones and neither process idles while the other ends a
long one. (xdist's own order, most tests first, left a one-test 50 s file for the end.)"""


def _cost_rank(item) -> tuple[int, int]:
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    if path in HEAVIEST_FIRST:
        return (0, HEAVIEST_FIRST.index(path))
    tier = path.split("/")[0]
    return (1, ("system", "strategies", "unit").index(tier) if tier in ("system", "strategies", "unit") else 3)


def pytest_collection_modifyitems(config, items):
    """`unit/` starts no processes: a unit test that asks for the session's Ray is misfiled.
    Files run heaviest first (`HEAVIEST_FIRST`); a file's own tests keep their order."""
    items.sort(key=_cost_rank)
    misfiled = [item.nodeid for item in items
                if "/unit/" in f"/{item.nodeid}" and "ray_session" in getattr(item, "fixturenames", ())]
    if misfiled:
        raise pytest.UsageError(f"tests under unit/ must start no Ray (move them to strategies/ or "
                                f"system/): {', '.join(misfiled)}")

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




def pytest_collection_modifyitems(config, items):
    """`unit/` starts no processes: a unit test that asks for the session's Ray is misfiled."""
    misfiled = [item.nodeid for item in items
                if "/unit/" in f"/{item.nodeid}" and "ray_session" in getattr(item, "fixturenames", ())]
    if misfiled:
        raise pytest.UsageError(f"tests under unit/ must start no Ray (move them to strategies/ or "
                                f"system/): {', '.join(misfiled)}")

"""Shared fixtures: one Ray per test session with pinned CPUs, a fresh MLflow store per test.

Tests live in three tiers: `unit/` (no processes), `strategies/` (real Ray actors and worker
groups, checked against `local`), `system/` (the CLI, clusters, sweeps, stores, servers);
what they share besides fixtures is in `helpers.py`.
"""
from __future__ import annotations

import pytest
from helpers import start_session_ray


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test models are tiny: on a 2-core machine shared with Ray workers, a second torch
    thread in the test process mostly waits."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once for the whole session."""
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

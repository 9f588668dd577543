"""Shared fixtures: one Ray per test session with pinned CPUs, a fresh MLflow store per test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test models are tiny: on a 2-core machine shared with Ray workers, a second torch
    thread in the test process mostly waits."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once for the whole session (Ray Train needs 2 worker CPUs)."""
    import ray

    from cluster.connect import LOCAL_SYSTEM_CONFIG, quiet_ray_logs

    quiet_ray_logs()
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, _system_config=LOCAL_SYSTEM_CONFIG)
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


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`raydeep ARGS` as a user would type it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def small_run(**overrides):
    """A run config for tests: digits, few epochs, no model artifact unless asked."""
    from pipelines import config

    base = {"strategy.name": "local", "optim.epochs": 2, "tracking.log_model": False}
    base.update(overrides)
    return config.load(overrides=base)

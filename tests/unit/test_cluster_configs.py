"""cluster/configs/: each file parses, and the fields that must agree with raydeep do.

No cluster is started: these are the promises a user relies on before paying for one (the
image or setup installs raydeep, the Jobs server listens where `raydeep submit` looks, the
entrypoint is a raydeep command, GPU workers ask Kubernetes for a GPU).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"
RAY_UP = ["aws.yaml", "gcp.yaml", "local.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_every_config_parses():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert names == sorted(RAY_UP + ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
    assert all(isinstance(load(n), dict) for n in names)


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_configs_install_raydeep_and_serve_jobs(name):
    c = load(name)
    setup = " ".join(c["setup_commands"])
    assert "pip install torch==2.13.0 -e ." in setup  # the README's pinned install
    mounted = [dst for dst, src in c["file_mounts"].items() if src == "."]
    assert mounted and any(f"cd {m.replace('/home/ubuntu', '~').replace('/home/raydeep', '~')}"
                           in setup for m in mounted)
    head = " ".join(c["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-port=8265" in head  # raydeep submit's default
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(c["worker_start_ray_commands"])
    assert any(dst.endswith(".ray/auth_token") for dst in c["file_mounts"])
    if c["provider"]["type"] == "local":
        assert c["provider"]["head_ip"] and len(c["provider"]["worker_ips"]) >= 1
    else:
        types = c["available_node_types"]
        assert types[c["head_node_type"]]["resources"] == {"CPU": 0}  # no training on the head
        gpu = types["gpu_worker"]["node_config"]
        assert gpu.get("InstanceType", "").startswith(("g", "p")) or gpu.get("guestAccelerators")


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def check_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"]["mode"] == "token"
    head = containers(spec["headGroupSpec"]["template"])[0]
    assert {"containerPort": 8265, "name": "dashboard"} in head["ports"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "raydeep" in head["image"]
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    worker = containers(gpu["template"])[0]
    assert worker["image"] == head["image"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["rayVersion"].split(".")[:2] == ["2", "60"]


def test_kuberay_raycluster():
    c = load("kuberay-raycluster.yaml")
    assert (c["apiVersion"], c["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(c["spec"])


def test_kuberay_rayjob_runs_a_raydeep_command_that_parses():
    c = load("kuberay-rayjob.yaml")
    assert (c["apiVersion"], c["kind"]) == ("ray.io/v1", "RayJob")
    spec = c["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], dict)
    check_cluster_spec(spec["rayClusterSpec"])
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["raydeep", "run"]
    args = build_parser().parse_args(command[1:])  # every flag is one raydeep knows
    # Several nodes: storage and tracking every node reaches (raydeep refuses local ones):
    # the storage path is on the volume every pod mounts, and the run says it is shared.
    storage = getattr(args, "resources.storage_path")
    assert "resources.shared_storage=true" in args.sets
    cluster_spec = spec["rayClusterSpec"]
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    for pod in pods:
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert any(storage.startswith(m + "/") for m in mounts), mounts
    assert getattr(args, "tracking.uri").startswith("http://")
    workers = int(getattr(args, "resources.workers"))
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["replicas"] >= workers  # one GPU pod per worker

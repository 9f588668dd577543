"""Several Ray nodes in this process (`ray.cluster_utils.Cluster`): where each strategy puts
its actors, and runs that lose a node.

A head of 1 CPU and two worker nodes of 2: a 2-actor run under SPREAD must use two
different nodes, under PACK one node, and after a worker's node is removed the others have
room for its replacement. The
session's local Ray is stopped for this module and started again after it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import TrainingInBackground, free_port, small_run, start_session_ray
from mlflow.tracking import MlflowClient

import pipelines

pytestmark = pytest.mark.slow


class Nodes:
    """A head of 1 CPU and two worker nodes of 2; a removed node is replaced by a fresh one.

    Each worker node has an address of its own (127.0.0.N): a driver attaches to the node
    at its machine's address, and with all three at one address it may attach to a worker
    node, whose loss would then take the driver's node (and the actors kept there) with it.
    """

    def __init__(self):
        from ray.cluster_utils import Cluster

        # A dashboard port of its own: Ray's default (8265) may be another Ray's on this
        # machine (the session Ray of a second pytest worker), and the head would not start.
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                                     "dashboard_port": free_port()})
        self.added = 0
        self.restore()

    def restore(self) -> None:
        while len(self.cluster.worker_nodes) < 2:
            self.added += 1
            self.cluster.add_node(num_cpus=2, node_ip_address=f"127.0.0.{self.added + 1}")
        self.cluster.wait_for_nodes()

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node)

    @property
    def head_id(self) -> str:
        return self.cluster.head_node.node_id


@pytest.fixture(scope="module")
def nodes():
    import ray

    from cluster.connect import quiet_ray_logs

    had_session = ray.is_initialized()
    ray.shutdown()
    # A temp folder of its own (short: socket paths): `Cluster` records its head in Ray's
    # `ray_current_cluster`, and any run on the machine that starts a Ray of its own
    # meanwhile would name it as a live cluster it does not join.
    short = tempfile.mkdtemp(prefix="rdm", dir="/tmp")
    kept = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = short
    three = Nodes()
    quiet_ray_logs()
    ray.init(address=three.cluster.address)
    assert ray.get_runtime_context().get_node_id() == three.head_id, "the driver is not on the head"
    yield three
    ray.shutdown()
    three.cluster.shutdown()
    os.environ.pop("RAY_TMPDIR") if kept is None else os.environ.update(RAY_TMPDIR=kept)
    shutil.rmtree(short, ignore_errors=True)
    if had_session:
        start_session_ray()


def actors(name_part: str | None = None, class_name: str | None = None,
           alive: bool = False) -> dict[str, str]:
    """{actor id: node id} of the cluster's actors (dead ones too, unless `alive`) whose name
    contains `name_part` or whose class is `class_name`."""
    import ray
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive else []
    found = list_actors(address=ray.get_runtime_context().gcs_address, filters=filters,
                        limit=10000, detail=True, raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in found
            if (class_name and a.class_name == class_name)
            or (name_part and a.name and name_part in a.name)}


def cluster_run(workdir: Path, strategy: str, name: str, **overrides):
    return small_run(**{"tracking.uri": f"sqlite:///{workdir / 'mlflow.db'}", "strategy.name": strategy,
                        "tracking.run_name": name, "resources.workers": 2, "model.width": 32,
                        "model.depth": 1, "optim.epochs": 1, "optim.steps_per_epoch": 4,
                        # one machine: every node sees the test's directory
                        "resources.shared_storage": True, **overrides})


PLACED = {  # case -> (strategy, extra settings, how its actors are found, PACK?)
    # SPREAD: lbfgs (pipeline reserves its stages through the same `placement.reserve`)
    # no backups: a worker whose process starts slowly would see its portion answered by
    # the other one, and might never run at all
    "lbfgs": ("lbfgs", {"strategy.portions": 2, "strategy.iterations_per_epoch": 2,
                        "strategy.backup_after": 0}, "worker-", False),
    "pipeline-pack": ("pipeline", {"strategy.stages": 2, "model.depth": 2, "resources.pack": True},
                      "stage-", True),
}  # ps and allreduce: in the node-loss tests below, before the node goes


def assert_placed(placed: list[str], out: str, pack: bool = False) -> None:
    """Two actors on two nodes (one under PACK), and the run's placement line names them."""
    assert len(placed) == 2 and len(set(placed)) == (1 if pack else 2), f"actors on nodes {placed}"
    heading = "placement (PACK) over 1 node(s)" if pack else "placement (SPREAD) over 2 node(s)"
    line = next((l for l in out.splitlines() if heading in l), "")
    for node in placed:
        assert f"(node {node[:8]})" in line, out[-2000:]


@pytest.mark.parametrize("case", list(PLACED))
def test_each_strategy_places_its_actors_as_asked(nodes, workdir, capfd, case):
    strategy, extra, actor, pack = PLACED[case]
    find = {"name_part": f":{case}:{actor}"}
    before = actors(**find)
    result = pipelines.train(cluster_run(workdir, strategy, case, **extra))
    assert_placed([node for a, node in actors(**find).items() if a not in before],
                  capfd.readouterr().out, pack)
    assert MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(result.run_id).info.status == "FINISHED"


def train_and_lose_a_node(nodes: Nodes, cfg, workdir: Path, find: dict, capfd, after_epoch: int = 0):
    """Train; once epoch `after_epoch` is checkpointed, check that the actors `find` names are
    spread over two nodes, then remove the one that is not the head. Returns the run's
    result and the removed node's id."""
    training = TrainingInBackground(cfg)
    training.wait_for_checkpoint(workdir, after_epoch)
    placed = list(actors(**find, alive=True).values())
    assert_placed(placed, capfd.readouterr().out)
    victim = next(n for n in placed if n != nodes.head_id)  # the driver's node stays
    nodes.remove(victim)
    try:
        return training.result(), victim
    finally:
        nodes.restore()


def test_ps_spreads_its_workers_and_replaces_those_of_a_lost_node(nodes, workdir, capfd):
    # staleness 0: the workers go in step, so when epoch 1 is saved no worker is done yet
    cfg = cluster_run(workdir, "ps", "lose-ps", **{"optim.epochs": 4, "optim.steps_per_epoch": 30,
                                                   "strategy.staleness": 0})
    find = {"name_part": ":lose-ps:worker-"}
    result, victim = train_and_lose_a_node(nodes, cfg, workdir, find, capfd)
    assert result.metrics["worker_restarts"] == 1
    placed = list(actors(**find).values())
    assert len(placed) == 3 and placed.count(victim) == 1, placed  # the replacement ran elsewhere
    assert "a new worker resumes its data" in capfd.readouterr().out
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(result.run_id, "train_loss")} == set(range(4))


def test_allreduce_spreads_its_ranks_and_restarts_from_a_checkpoint_after_losing_a_node(
        nodes, workdir, capfd):
    cfg = cluster_run(workdir, "allreduce", "lose-allreduce",
                      **{"optim.epochs": 4, "optim.steps_per_epoch": 30})
    # After epoch 1's checkpoint is on disk: epoch 0's `ray.train.report` has returned by then
    # (each worker reports in order), so Ray Train holds a checkpoint to restart from. Waiting
    # for epoch 0's directory alone lost that race once under a loaded machine (the group
    # restarted from scratch).
    result, _ = train_and_lose_a_node(nodes, cfg, workdir, {"class_name": "RayTrainWorker"}, capfd,
                                      after_epoch=1)
    assert result.metrics["worker_restarts"] >= 1
    client = MlflowClient(cfg.tracking.uri)
    starts = [m.value for m in client.get_metric_history(result.run_id, "worker_group_start_epoch")]
    assert starts[0] == 0 and max(starts) >= 1, f"the restart did not resume from a checkpoint: {starts}"
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(result.run_id, "train_loss")} == set(range(4))

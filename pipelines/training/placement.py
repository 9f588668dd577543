"""Where a strategy's own actors run: one placement group over `Strategy.actor_bundles`.

SPREAD by default: workers on different nodes use every node's network link and a lost node
takes one worker with it, not all. `resources.pack` asks for PACK (fewest nodes, traffic
stays inside a machine). Each actor is pinned to its bundle, so the group's table says which
node runs which actor, and the run's log says it before training starts.

Inside a Ray Tune trial the trial has reserved these bundles in its own group already
(`Strategy.bundles_in_trial`); a second group would wait forever for resources the first
holds, so there the actors are simply captured by the trial's group.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from pipelines import imported_model
from pipelines.config import RunConfig


def worker_bundle(run: RunConfig) -> dict[str, float]:
    """The resources of one worker actor as the run's `resources` section asks."""
    bundle = {"CPU": run.resources.cpus_per_worker}
    if run.resources.gpus_per_worker > 0:
        bundle["GPU"] = run.resources.gpus_per_worker
    return bundle


def total(bundles: list[dict[str, float]]) -> dict[str, float]:
    """The resources of `bundles` added up, per kind."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    return need


def shortfall(bundles: list[dict[str, float]], available: dict[str, float]) -> str | None:
    """What a run's actors need that the cluster does not have, in one line (Ray would wait
    for it forever); None when it fits."""
    need = total(bundles)
    for key, amount in sorted(need.items()):
        have = available.get(key, 0.0)
        if amount > have:
            return (f"the run's {len(bundles)} actors need {amount:g} {key} in all, and the Ray cluster "
                    f"has {have:g}: lower resources.workers, cpus_per_worker or gpus_per_worker "
                    f"(or the strategy's own sizes), or add nodes")
    return None


class Placement:
    """The scheduling options of each actor slot; empty where no group of ours exists."""

    def __init__(self, group=None, size: int = 0, runtime_env: dict | None = None):
        self.group, self.size = group, size
        self.runtime_env = runtime_env or {}
        """What every actor of the run needs beyond the job's own (a user's model code)."""

    def at(self, index: int) -> dict:
        """Keyword arguments for `.options(...)` of the actor in bundle `index`.

        An actor without a bundle (index -1: a coordinator, a shard that takes no CPU) goes
        on the driver's node: the run ends with that node anyway, and a lost worker node
        then never takes the state the survivors need with it. The affinity is hard: a soft
        one let Ray put these zero-CPU actors on any node (seen on a 3-node cluster), and a
        node lost there then failed the run.
        """
        options = {"runtime_env": self.runtime_env} if self.runtime_env else {}
        if self.group is None:
            return options
        import ray
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        if not 0 <= index < self.size:
            return {**options, "scheduling_strategy": NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)}
        return {**options, "scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=index)}

    def nodes(self) -> list[str]:
        """Node id of each bundle, in bundle order (empty without a group)."""
        if self.group is None:
            return []
        from ray.util import placement_group_table

        table = placement_group_table(self.group)["bundles_to_node_id"]
        return [table.get(i, "") for i in range(self.size)]


@contextmanager
def reserve(strategy, run: RunConfig, say, labels: list[str] | None = None,
            timeout_s: float = 120.0) -> Iterator[Placement]:
    """A placement group over the strategy's bundles for the body; none inside a Tune trial.

    `labels` names the actor of each bundle for the log line (default: bundle-N).
    """
    import ray
    from ray.util import get_current_placement_group, placement_group, remove_placement_group

    bundles = strategy.actor_bundles(run)
    code = imported_model.actor_runtime_env(run)
    if not bundles or get_current_placement_group() is not None:
        yield Placement(runtime_env=code)
        return
    mode = "PACK" if run.resources.pack else "SPREAD"
    group = placement_group(bundles, strategy=mode, name=f"raydeep-{strategy.name}")
    try:
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(
                f"the cluster cannot hold {len(bundles)} actors of {bundles[0]} ({mode}) within "
                f"{timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}")
        place = Placement(group, len(bundles), code)
        say(describe(place.nodes(), labels or [f"bundle-{i}" for i in range(len(bundles))], mode))
        yield place
    finally:
        remove_placement_group(group)


def describe(nodes: list[str], labels: list[str], mode: str) -> str:
    """'placement (SPREAD) over 2 nodes: worker-0 on 10.0.0.1 (node 3f2a9c1d), ...'"""
    import ray

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    where = ", ".join(f"{label} on {ips.get(node, '?')} (node {node[:8]})"
                      for label, node in zip(labels, nodes))
    return f"placement ({mode}) over {len(set(nodes))} node(s): {where}"

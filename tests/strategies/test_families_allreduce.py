"""Every registered family trains under `allreduce`'s loop (DDP over gloo) through the common
seams, in one Ray Train worker group: each family is a short run of `train_epochs` with the
strategy's own `ddp_collective`, its greedy pre-training phases under DDP too. The same MLP
run is trained twice in the group and must give the same bits (weights and logged metrics).

A worker group costs Ray Train about 14 s to start here; one group for all the families
instead of one per family. MLP and CNN runs of the whole strategy (checkpoints, restarts,
the final evaluation) are in test_allreduce.py; every family's whole run under `local` is in
test_models.py and the family tests.
"""
import math

import pytest
from helpers import small_run
from mlflow.tracking import MlflowClient

import models
from pipelines.tracking import Tracker

pytestmark = pytest.mark.slow

FAMILIES = [name for name in models.names() if name not in ("mlp", "cnn")]


def train_every_family(config: dict) -> None:
    """On each Ray Train worker: the allreduce loop over each family in turn; the replicas
    must hold the very same weights after it (DDP averaged every gradient)."""
    import torch
    import torch.distributed as dist

    from pipelines import data as datasets
    from pipelines.strategies.allreduce import ddp_collective
    from pipelines.training.epochs import train_epochs
    from pipelines.training.flat import flat_parameters

    comm = ddp_collective()
    trained = {}
    for family, (run, tracker) in config["families"].items():
        data = datasets.load(run.data, run.seed)
        def log(epoch, metrics, *state, tracker=tracker):
            if comm.rank == 0:
                tracker.log_epoch(epoch, metrics)

        model = train_epochs(run, data, tracker, comm, None, log)
        mine = flat_parameters(model).detach()
        replicas = [torch.empty_like(mine) for _ in range(comm.world)]
        dist.all_gather(replicas, mine)
        assert all(torch.equal(r, replicas[0]) for r in replicas), f"{family}: replicas differ"
        trained[family] = mine
    # The same training twice gives the same bits: DDP's gradient buckets and the metric
    # sums are reduced in a fixed order, never in the order the parts arrive.
    assert torch.equal(trained["mlp"], trained["mlp-again"]), "the same allreduce run gave other bits"
    check_throttled_buckets(comm)


def check_throttled_buckets(comm) -> None:
    """`resources.link_mbps` under DDP: each bucket waits for a ring allreduce's bytes of it
    (2 (W - 1) / W of the bucket) and is then averaged as DDP's own allreduce does."""
    import ray.train.torch
    import torch

    from pipelines.training.link import Link, throttle_ddp, transfer_seconds

    def replica():
        torch.manual_seed(0)
        return ray.train.torch.prepare_model(torch.nn.Linear(64, 10))

    link = Link(1000.0)
    plain, throttled = replica(), throttle_ddp(replica(), link, comm.world)
    torch.manual_seed(comm.rank)  # each rank its own batch: the average is not any one of them
    x = torch.randn(8, 64)
    for model in (plain, throttled):
        model(x).square().sum().backward()
    numel = sum(p.numel() for p in plain.parameters())
    # one bucket or several: their waits add up to the whole gradient's (within float rounding)
    assert math.isclose(link.waited_s, transfer_seconds(2 * (comm.world - 1) / comm.world * numel * 4, 1000.0),
                        rel_tol=1e-9), link.waited_s
    for a, b in zip(plain.parameters(), throttled.parameters()):
        assert torch.equal(a.grad, b.grad), "the throttled bucket was reduced otherwise"


def test_every_family_trains_in_one_allreduce_worker_group(ray_session, store):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

    families = {}
    for family in FAMILIES:
        sequences = {"data.source": "lgssm", "data.sequences.samples": 200} if models.get(family).sequences else {}
        run = small_run(**{"tracking.uri": store, "strategy.name": "allreduce", "model.name": family,
                           "optim.epochs": 1, "optim.steps_per_epoch": 3, "optim.lr": 0.01, **sequences})
        tracker = Tracker.start(store, "families", family, {}, epochs=1)
        tracker.echo = False
        families[family] = (run, tracker)
    for name in ("mlp", "mlp-again"):  # the same run twice, for determinism
        tracker = Tracker.start(store, "families", name, {}, epochs=2)
        tracker.echo = False
        families[name] = (small_run(**{"tracking.uri": store, "strategy.name": "allreduce",
                                       "optim.epochs": 2, "optim.steps_per_epoch": 6}), tracker)
    trainer = TorchTrainer(train_every_family, train_loop_config={"families": families},
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="every-family", storage_path=str(store_dir(store))))
    result = trainer.fit()
    assert result.error is None, result.error  # a worker's failed check fails the group
    client = MlflowClient(store)
    for family, (run, tracker) in families.items():
        metrics = client.get_run(tracker.run_id).data.metrics
        assert math.isfinite(metrics["train_loss"]), family
        validation = [k for k in metrics if k.startswith("val_")]
        assert validation and all(math.isfinite(metrics[k]) for k in validation), family
        phases = getattr(_built(run), "pretrain_phases", lambda: [])()
        for phase in phases:
            assert f"pretrain_{phase.name}_loss" in metrics, (family, phase.name)
    # ... and logs the same metrics, summed over the ranks in rank order.
    histories = [{key: [m.value for m in sorted(client.get_metric_history(families[name][1].run_id, key),
                                                key=lambda m: m.step)]
                  for key in ("train_loss", "val_loss", "val_accuracy")} for name in ("mlp", "mlp-again")]
    assert histories[0] == histories[1] and len(histories[0]["train_loss"]) == 2


def store_dir(store: str):
    from pathlib import Path

    return Path(store.removeprefix("sqlite:///")).parent / "ray_train"


def _built(run):
    from pipelines.training.loop import ModelShape, build_model

    return build_model(run, ModelShape((1, 8, 8), 10))

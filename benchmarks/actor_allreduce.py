"""Prototype: allreduce on raydeep's own actor group against Ray Train's `TorchTrainer`.

Should `allreduce` keep Ray Train? This measures what an allreduce on a gloo process group
formed among plain Ray actors (as the pipeline stages form theirs) costs to start and to
run, beside raydeep's `allreduce` (Ray Train V2) on the same machine, model, data and batch
plan, each on a fresh embedded Ray started the way `raydeep run` starts it:

    .venv/bin/python benchmarks/actor_allreduce.py                  # 3 repeats, about 3 minutes
    .venv/bin/python benchmarks/actor_allreduce.py --repeats 5 --epochs 6 --json out.json

Per variant and repeat: Ray's start (`connect`), the time from the variant's start (after
Ray is up) to the end of the first optimizer step, and the steady samples/s (epochs after
the first, timed inside the workers as `allreduce` times them). The order of the two
variants alternates between repeats. Printed: the median and range of each figure.

The actor group's training is `ddp_reference.train` with raydeep's own step loop: the same
DDP-wrapped objective, batch plan, optimizer and epoch timing as `pipelines.strategies.allreduce`; it
has no checkpoints, MLflow or restarts, which is part of what Ray Train gives (see the
note at the end of the output).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--json", default=None)
    return p.parse_args()


def run_config(args, workdir: Path):
    from pipelines import config

    return config.load(overrides={
        "model.name": "mlp", "model.width": 256, "model.depth": 2, "data.source": "synthetic",
        "data.synthetic_samples": args.samples, "data.synthetic_shape": [64], "data.batch_size": 128,
        "optim.epochs": args.epochs, "resources.workers": args.workers, "strategy.name": "allreduce",
        "tracking.uri": f"sqlite:///{workdir / 'mlflow.db'}", "tracking.log_model": False,
        "resources.storage_path": str(workdir / "runs")})


class GroupWorker:
    """One rank of an allreduce group made of plain Ray actors."""

    def __init__(self):
        import torch

        torch.set_num_threads(1)

    def address(self):
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def train(self, host, port, rank, world, run_dict, data, launched_at):
        from datetime import timedelta

        import torch.distributed as dist

        sys.path.insert(0, str(Path(__file__).resolve().parent))  # this class travels by value
        import ddp_reference

        from pipelines import config

        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=world, timeout=timedelta(minutes=5))
        try:
            return ddp_reference.train(config.from_dict(run_dict), data, rank, world, loop="raydeep",
                                       label="actors", launched_at=launched_at)
        finally:
            dist.barrier()
            dist.destroy_process_group()


def actor_group(cfg, data) -> dict:
    import ray

    began = time.time()
    workers = [ray.remote(GroupWorker).options(num_cpus=cfg.resources.cpus_per_worker).remote()
               for _ in range(cfg.resources.workers)]
    host, port = ray.get(workers[0].address.remote())
    data_ref = ray.put(data)
    results = ray.get([w.train.remote(host, port, rank, len(workers), cfg.to_dict(), data_ref, began)
                       for rank, w in enumerate(workers)])
    return {"first_step_s": results[0]["time_to_first_step_s"],
            "steady_samples_per_s": results[0]["steady_samples_per_s"]}


def ray_train(cfg, data) -> dict:
    import pipelines
    from pipelines import startup

    startup.launched()
    result = pipelines.train(cfg, data)
    later = [h["samples_per_s"] for h in result.history[1:]]
    return {"first_step_s": result.metrics["time_to_first_step_s"],
            "steady_samples_per_s": sum(later) / len(later)}


def one(variant: str, args) -> dict:
    import ray

    from cluster.connect import connect
    from pipelines import data as datasets

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(args, Path(tmp))
        data = datasets.load(cfg.data, cfg.seed)
        t0 = time.perf_counter()
        connect(num_cpus=args.workers)
        ray_init_s = time.perf_counter() - t0
        try:
            figures = (actor_group if variant == "actors" else ray_train)(cfg, data)
        finally:
            ray.shutdown()
    return {"ray_init_s": ray_init_s, **figures}


def main() -> None:
    args = parse_args()
    variants = ["actors", "ray_train"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in (variants if repeat % 2 == 0 else variants[::-1]):
            r = one(variant, args)
            runs[variant].append(r)
            print(f"[{repeat + 1}/{args.repeats}] {variant:<10} ray.init {r['ray_init_s']:.1f} s  first step "
                  f"{r['first_step_s']:.1f} s  steady {r['steady_samples_per_s']:,.0f} samples/s", flush=True)

    def summary(variant: str, key: str) -> str:
        values = [r[key] for r in runs[variant]]
        return f"{statistics.median(values):,.1f} [{min(values):,.1f} - {max(values):,.1f}]"

    print(f"\nmedian [range] over {args.repeats} repeats; first step from the variant's start, Ray up")
    for variant in variants:
        print(f"  {variant:<10} ray.init {summary(variant, 'ray_init_s')} s   first step "
              f"{summary(variant, 'first_step_s')} s   steady {summary(variant, 'steady_samples_per_s')} samples/s")
    ratio = [a["steady_samples_per_s"] / b["steady_samples_per_s"]
             for a, b in zip(runs["actors"], runs["ray_train"])]
    print(f"  steady throughput, actors / Ray Train: {statistics.median(ratio):.3f} "
          f"[{min(ratio):.3f} - {max(ratio):.3f}]")
    print("\nWhat Ray Train gives that an own group would have to rebuild: restarting the group from "
          "the last checkpoint after a lost worker or node (FailureConfig), checkpoint persistence "
          "to local or object storage, Tune integration (TuneReportCallback, trial resources), "
          "the worker group's placement and health checks, GPU device and NCCL set-up, and Ray "
          "Data sharding into the workers.")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()

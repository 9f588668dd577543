"""raydeep `diloco` against `allreduce` and `ps` on the same model, data and workers (issue 22).

    python benchmarks/local_sgd.py [--epochs 10 --repeats 3 --link-mbps 0 20]

In one run, on one embedded local Ray, each configuration `--repeats` times at each link
speed: `allreduce`, `ps` with n_push = n_fetch = 1 and 4, `diloco` with H = 16, 64, 128 and
256 and H = 64 in bfloat16 (an epoch of digits at a global batch of 64 is 20 steps: a longer
H makes rounds of the nearest whole number of epochs, cut evenly over the run).
Printed per configuration, as median [min-max] over the repeats: the training time until
validation accuracy first reaches --target (from the first optimizer step), samples/s after
the first epoch, the bytes each worker sent, and the final test accuracy; then DiLoCo's
bytes and accuracy against allreduce's (goals: >= 100x fewer bytes, within 0.5 points).

Bytes: `diloco` counts what its workers sent (its pseudo-gradients); `ps` sends one push of
the model (float32) per n_push steps; `allreduce` would send 2 (W-1)/W of the float32
gradient per step in a ring allreduce (Ray Train's DDP over gloo: a model of its traffic,
not a count). `--link-mbps` runs every configuration with `resources.link_mbps` at each
speed given (0: none): the workers really wait for their bytes (`pipelines.training.link`),
so the times to target are those of a slow cross-node link.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from param_server import run_config, time_to_target  # noqa: E402  (a sibling script)

CONFIGS = {
    "allreduce": ("allreduce", {}),
    "ps n=1": ("ps", {}),
    "ps n=4": ("ps", {"strategy.n_push": 4, "strategy.n_fetch": 4}),
    "diloco H=16": ("diloco", {"strategy.sync_every": 16}),
    "diloco H=64": ("diloco", {"strategy.sync_every": 64}),
    "diloco H=64 bf16": ("diloco", {"strategy.sync_every": 64, "strategy.push_dtype": "bfloat16"}),
    "diloco H=128": ("diloco", {"strategy.sync_every": 128}),
    "diloco H=256": ("diloco", {"strategy.sync_every": 256}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (each worker: 1/W of it)")
    p.add_argument("--optimizer", default="sgd", help="every run's (inner) optimizer: raydeep's default")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--target", type=float, default=0.95, help="validation accuracy to reach")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--link-mbps", type=float, nargs="+", default=[0.0],
                   help="link speeds to throttle the workers' exchanges to, megabits/s (0: none)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded Ray")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def bytes_per_worker(strategy: str, result, args, numel: int, steps: int) -> float:
    if strategy == "diloco":
        return result.metrics["bytes_sent_per_worker_total"]
    if strategy == "ps":
        return result.metrics["updates"] / args.workers * numel * 4
    from pipelines.strategies.diloco.driver import ring_allreduce_bytes

    return ring_allreduce_bytes(steps, args.workers, numel)


def run_one(args, name: str, workdir: Path, link_mbps: float) -> dict:
    import pipelines
    from pipelines import data, startup
    from pipelines.training.loop import steps_per_epoch

    strategy, extra = CONFIGS[name]
    cfg = run_config(args, strategy, workdir, **extra, **{"resources.link_mbps": link_mbps})
    submitted = time.time()
    startup.launched(submitted)
    result = pipelines.train(cfg)
    first_step_at = submitted + result.metrics["time_to_first_step_s"]
    reached = time_to_target(cfg.tracking.uri, result.run_id, args.target, first_step_at)
    numel = int(result.metrics["num_params"])
    steps = args.epochs * steps_per_epoch(len(data.load(cfg.data, cfg.seed).y_train), args.batch_size)
    sent = bytes_per_worker(strategy, result, args, numel, steps)
    steady = result.history[1:] or result.history
    return {"time_to_target_s": reached, "samples_per_s": statistics.mean(h["samples_per_s"] for h in steady),
            "bytes_per_worker": sent, "test_accuracy": result.metrics["test_accuracy"]}


def spread(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def report(args, link: float, results: dict[str, list[dict]]) -> None:
    where = f"workers' exchanges throttled to {link:g} Mbit/s" if link else "no link throttle"
    print(f"\n{args.model}, {args.workers} workers, {args.epochs} epochs, target val {args.target}, "
          f"median [min-max] of {args.repeats}; {where}")
    print(f"{'config':<17} {'to target s':>18} {'samples/s':>24} {'MB/worker':>20} {'test acc':>22}")
    for name, runs in results.items():
        print(f"{name:<17} {spread([r['time_to_target_s'] for r in runs], '.1f'):>18} "
              f"{spread([r['samples_per_s'] for r in runs], ',.0f'):>24} "
              f"{spread([r['bytes_per_worker'] / 1e6 for r in runs], '.2f'):>20} "
              f"{spread([r['test_accuracy'] for r in runs], '.4f'):>22}")
    if "allreduce" in results:
        base = results["allreduce"]
        for name in (n for n in results if n.startswith("diloco")):
            ratio = [b["bytes_per_worker"] / d["bytes_per_worker"] for b, d in zip(base, results[name])]
            gap = [100 * (d["test_accuracy"] - b["test_accuracy"]) for b, d in zip(base, results[name])]
            print(f"{name}: {spread(ratio, '.0f')}x fewer bytes than allreduce (goal >= 100), test accuracy "
                  f"{spread(gap, '+.2f')} points from allreduce's (goal >= -0.5)")
    sys.stdout.flush()


def main() -> None:
    args = parse_args()
    import os

    import ray

    from cluster.connect import LOCAL_RAY_ENV, LOCAL_SYSTEM_CONFIG, filter_worker_logs, quiet_ray_logs

    quiet_ray_logs()
    for key, value in LOCAL_RAY_ENV.items():  # as `raydeep run`'s embedded Ray
        os.environ.setdefault(key, value)
    ray.init(num_cpus=args.num_cpus, include_dashboard=True, _system_config=LOCAL_SYSTEM_CONFIG)
    filter_worker_logs()
    root = Path(tempfile.mkdtemp(prefix="raydeep-local-sgd-"))
    for link in args.link_mbps:
        results: dict[str, list[dict]] = {name: [] for name in args.configs}
        for repeat in range(args.repeats):  # interleaved: a noisy minute hits every configuration alike
            for name in args.configs:
                workdir = root / f"{name.replace(' ', '_').replace('=', '')}-{link:g}-{repeat}"
                workdir.mkdir()
                results[name].append(run_one(args, name, workdir, link))
        report(args, link, results)
    ray.shutdown()


if __name__ == "__main__":
    main()

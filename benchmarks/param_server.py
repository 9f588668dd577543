"""raydeep `ps` against Ray's documented async parameter server and against raydeep `allreduce`.

    python benchmarks/param_server.py [--model mlp --workers 2 --shards 2 --epochs 10]

In one run, on one embedded local Ray, the same model, data (digits), batch plan, initial
weights, optimizer and number of workers:

1. **raydeep ps**: `pipelines.train` with `strategy.name=ps` (fully asynchronous, S shards);
2. **documented example**: the pattern of Ray's "Parameter Server" example (async variant),
   written here as the peer: one unsharded `ParameterServer` actor, `DataWorker` actors that
   compute a gradient from a weights dict, and a driver loop that `ray.wait`s for any
   gradient, sends it to the server and hands the returned weights (a dict of arrays,
   through the object store) to that worker for its next gradient. Its update math is
   raydeep's (the run's optimizer, each push scaled by 1/W), so only the system differs;
3. **raydeep allreduce**: `pipelines.train` with `strategy.name=allreduce` (Ray Train + DDP).

For each: samples/s and updates/s in steady state (epochs after the first), and the
training time until validation accuracy first reaches --target (0.97), counted from the
first optimizer step so that actor and worker-group start-up (printed apart) do not count.
Then the ratios: ps / documented example throughput (goal >= 2) and ps / allreduce
time-to-accuracy (goal <= 1.2). The goals are reported, not enforced.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ps", default="S=1:n=1,S=2:n=1,S=1:n=4,S=1:n=4:bf16",
                   help="comma list of ps variants: shards S, n_push = n_fetch n, bf16 pushes")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (each worker: 1/W of it)")
    p.add_argument("--optimizer", default="adagrad", help="every run's optimizer (Downpour's: adagrad)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--target", type=float, default=0.97, help="validation accuracy to reach")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded Ray")
    p.add_argument("--seed", type=int, default=1,
                   help="seed 1: on seed 0's split the MLP tops out near val 0.97 under every strategy")
    return p.parse_args(argv)


def run_config(args, strategy: str, workdir: Path, **extra):
    from pipelines import config

    overrides = {"model.name": args.model, "strategy.name": strategy, "resources.workers": args.workers,
                 "optim.epochs": args.epochs, "optim.lr": args.lr, "optim.name": args.optimizer,
                 "data.batch_size": args.batch_size,
                 "seed": args.seed, "tracking.uri": f"sqlite:///{workdir}/mlflow.db",
                 "tracking.log_model": False, "resources.storage_path": str(workdir / "runs"), **extra}
    return config.load(overrides=overrides)


def ps_options(variant: str) -> dict:
    """`S=2:n=4:bf16` -> the strategy options it names."""
    options = {}
    for part in variant.split(":"):
        key, _, value = part.partition("=")
        if key == "S":
            options["strategy.shards"] = int(value)
        elif key == "n":
            options["strategy.n_push"] = options["strategy.n_fetch"] = int(value)
        elif key == "bf16":
            options["strategy.push_dtype"] = "bfloat16"
        else:
            raise SystemExit(f"param_server.py: error: unknown ps variant part {part!r} in {variant!r}")
    return options


def time_to_target(tracker_uri: str, run_id: str, target: float, first_step_at: float) -> float | None:
    """Seconds from the first step until `val_accuracy` was first logged at or above target."""
    from mlflow.tracking import MlflowClient

    history = sorted(MlflowClient(tracker_uri).get_metric_history(run_id, "val_accuracy"),
                     key=lambda m: m.step)
    for m in history:
        if m.value >= target:
            return m.timestamp / 1000 - first_step_at
    return None


def run_raydeep(args, strategy: str, workdir: Path, **extra) -> dict:
    import pipelines
    from pipelines import startup

    cfg = run_config(args, strategy, workdir, **extra)
    submitted = time.time()
    startup.launched(submitted)  # the origin of the run's time_to_first_step_s
    result = pipelines.train(cfg)
    first_step_at = submitted + result.metrics["time_to_first_step_s"]
    steady = result.history[1:] or result.history
    samples = float(np.mean([h["samples_per_s"] for h in steady]))
    updates = (float(np.mean([h["updates_per_s"] for h in steady])) if "updates_per_s" in steady[0]
               else samples / args.batch_size)  # allreduce: one update per global batch
    return {"samples_per_s": samples, "updates_per_s": updates,
            "startup_s": first_step_at - submitted,
            "time_to_target_s": time_to_target(cfg.tracking.uri, result.run_id, args.target, first_step_at),
            "test_accuracy": result.metrics["test_accuracy"]}


# --- the documented example's pattern ------------------------------------------------------

class ParameterServer:
    """One server holding the whole model, as in Ray's example."""

    def __init__(self, cfg, input_shape, num_classes):
        import torch

        from pipelines.training.loop import ModelShape, build_model, make_optimizer

        torch.set_num_threads(1)
        self.model = build_model(cfg, ModelShape(tuple(input_shape), num_classes))
        self.optimizer = make_optimizer(cfg.optim, self.model.parameters())

    def apply_gradients(self, *gradients):
        import torch

        summed = [np.stack(g).sum(axis=0) for g in zip(*gradients)]
        self.optimizer.zero_grad()
        for p, g in zip(self.model.parameters(), summed):
            p.grad = torch.from_numpy(g)
        self.optimizer.step()
        return self.get_weights()

    def get_weights(self):
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}


class DataWorker:
    def __init__(self, cfg, data, rank: int, world: int):
        from pipelines.training.loop import batch_indices, build_model

        self.model = build_model(cfg, data)
        self.data, self.rank, self.world = data, rank, world
        self.batches = (idx for epoch in itertools.count()
                        for idx in batch_indices(len(data.y_train), cfg.data.batch_size, seed=cfg.seed,
                                                 epoch=epoch, rank=rank, world=world))

    def compute_gradients(self, weights):
        import torch

        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        idx = next(self.batches)
        self.model.zero_grad()
        self.model.train()
        self.model.loss((self.data.x_train[idx], self.data.y_train[idx])).backward()
        return [p.grad.numpy() / self.world for p in self.model.parameters()]


def run_documented(args, workdir: Path) -> dict:
    import ray
    import torch

    from pipelines import data as datasets
    from pipelines.training.loop import build_model, evaluate_sums, steps_per_epoch

    cfg = run_config(args, "local", workdir)
    data = datasets.load(cfg.data, cfg.seed)
    started = time.time()
    ps = ray.remote(ParameterServer).options(num_cpus=0).remote(cfg, data.input_shape, data.num_classes)
    workers = [ray.remote(DataWorker).options(num_cpus=1).remote(cfg, data, r, args.workers)
               for r in range(args.workers)]
    current = ps.get_weights.remote()
    ray.get([w.__ray_ready__.remote() for w in workers] + [current])
    first_step_at = time.time()
    per_epoch = steps_per_epoch(len(data.y_train), args.batch_size) * args.workers
    evaluate = build_model(cfg, data)
    gradients = {w.compute_gradients.remote(current): w for w in workers}
    updates, epoch_marks, reached, eval_s, accuracy = 0, [first_step_at], None, 0.0, 0.0
    for _ in range(args.epochs * per_epoch):  # the example's `iterations * num_workers`
        ready, _ = ray.wait(list(gradients))
        worker = gradients.pop(ready[0])
        current = ps.apply_gradients.remote(ready[0])
        updates += 1
        gradients[worker.compute_gradients.remote(current)] = worker
        if updates % per_epoch == 0:  # evaluate once per epoch's worth of updates
            began = time.time()
            evaluate.load_state_dict({k: torch.from_numpy(v) for k, v in ray.get(current).items()})
            sums = evaluate_sums(evaluate, data.x_val, data.y_val)
            accuracy = sums["accuracy"] / sums["count"]
            eval_s += time.time() - began
            epoch_marks.append(time.time() - eval_s)
            if reached is None and accuracy >= args.target:
                reached = epoch_marks[-1] - first_step_at
    durations = np.diff(epoch_marks)[1:] if len(epoch_marks) > 2 else np.diff(epoch_marks)
    updates_per_s = per_epoch / float(np.mean(durations))
    for actor in [ps, *workers]:
        ray.kill(actor)
    return {"samples_per_s": updates_per_s * args.batch_size / args.workers,
            "updates_per_s": updates_per_s, "startup_s": first_step_at - started,
            "time_to_target_s": reached, "test_accuracy": float("nan"), "val_accuracy": accuracy}


def main(argv=None) -> int:
    args = parse_args(argv)
    from cluster.connect import connect

    connect(num_cpus=args.num_cpus)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for variant in args.ps.split(","):
            rows[f"raydeep ps {variant}"] = run_raydeep(args, "ps", workdir, **ps_options(variant))
        rows["documented example"] = run_documented(args, workdir)
        rows["raydeep allreduce"] = run_raydeep(args, "allreduce", workdir)
    print(f"\n{args.model} on digits, {args.workers} workers, global batch {args.batch_size}, "
          f"{args.epochs} epochs, target val_accuracy {args.target}")
    print(f"{'':<28} {'samples/s':>10} {'updates/s':>10} {'to target (s)':>14} {'start-up (s)':>13} "
          f"{'test acc':>9}")
    for name, row in rows.items():
        target = f"{row['time_to_target_s']:.2f}" if row["time_to_target_s"] is not None else "not reached"
        print(f"{name:<28} {row['samples_per_s']:>10,.0f} {row['updates_per_s']:>10,.1f} "
              f"{target:>14} {row['startup_s']:>13.1f} {row['test_accuracy']:>9.4f}")
    doc, ar = rows["documented example"], rows["raydeep allreduce"]
    print()
    for name, ps in rows.items():
        if not name.startswith("raydeep ps"):
            continue
        line = f"{name}: samples/s / documented example {ps['samples_per_s'] / doc['samples_per_s']:.2f} (goal >= 2)"
        if ps["time_to_target_s"] and ar["time_to_target_s"]:
            line += f"; time to target / allreduce {ps['time_to_target_s'] / ar['time_to_target_s']:.2f} (goal <= 1.2)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

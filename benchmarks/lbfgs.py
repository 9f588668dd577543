"""raydeep `lbfgs` (W workers, S shards) against single-process `torch.optim.LBFGS`.

    python benchmarks/lbfgs.py [--samples 40000 --shape 1,2,2 --width 256 --depth 2 --iterations 50 --workers 2]

In one run, on the same data (synthetic, --samples examples of --shape), model, initial
weights and L-BFGS settings (history 10, strong-Wolfe line search, lr 1):

1. **torch**: `torch.optim.LBFGS.step` for --iterations iterations on the full training
   split, in this process with --torch-threads threads (default: as many as workers, so
   both sides use the same cores). Its final loss is the target.
2. **raydeep lbfgs**: the strategy's coordinator (`pipelines.strategies.lbfgs.driver.Sandblaster`) on an
   embedded local Ray, one iteration per call, until its loss reaches the target (at most
   twice as many iterations). Actor start-up and the first evaluation of the objective (which
   torch's timed `step` includes) are timed apart.

Reported: iterations/s, the time to reach the target loss, and the ratios raydeep / torch.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=40000, help="synthetic examples (72%% train)")
    p.add_argument("--shape", default="1,2,2",
                   help="4 features: the classes overlap, so 50 iterations do not reach loss 0")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--iterations", type=int, default=50, help="torch's iterations: sets the target")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--portions", type=int, default=None, help="default 4 x workers")
    p.add_argument("--torch-threads", type=int, default=None, help="default: --workers")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded Ray")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_config(args, store: str):
    from pipelines import config

    overrides = {
        "strategy.name": "lbfgs", "model.name": "mlp", "model.width": args.width, "model.depth": args.depth,
        "data.source": "synthetic", "data.synthetic_samples": args.samples,
        "data.synthetic_shape": [int(s) for s in args.shape.split(",")], "resources.workers": args.workers,
        "strategy.shards": args.shards, "strategy.portions": args.portions,
        "strategy.iterations_per_epoch": 1, "strategy.max_evals_per_epoch": 25,
        "tracking.uri": store, "tracking.log_model": False, "seed": args.seed}
    return config.load(overrides={k: v for k, v in overrides.items() if v is not None})


def torch_side(run, data, iterations: int, threads: int) -> dict:
    import torch

    from pipelines.training.loop import build_model

    torch.set_num_threads(threads)
    model = build_model(run, data).train()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iterations, max_eval=iterations * 25,
                                  history_size=10, line_search_fn="strong_wolfe")
    batch = (data.x_train, data.y_train)

    def closure():
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        return loss

    began = time.perf_counter()
    optimizer.step(closure)
    seconds = time.perf_counter() - began
    with torch.no_grad():
        final = float(model.loss(batch))
    done = optimizer.state[optimizer._params[0]]["n_iter"]
    return {"iterations": done, "seconds": seconds, "loss": final,
            "evaluations": optimizer.state[optimizer._params[0]]["func_evals"]}


def raydeep_side(run, data, target: float, max_iterations: int, workdir: Path) -> dict:
    import ray

    from pipelines.context import RunContext
    from pipelines.storage import RunDir
    from pipelines.strategies.lbfgs.driver import Sandblaster
    from pipelines.tracking import Tracker

    tracker = Tracker.start(run.tracking.uri, "lbfgs-benchmark", "raydeep", {})
    tracker.echo = False
    began = time.perf_counter()
    driver = Sandblaster(run, data, RunContext(run, tracker, RunDir("raydeep", workdir / "raydeep")))
    try:
        ray.get([s.run.remote([]) for s in driver.shards])
        started = time.perf_counter() - began
        began = time.perf_counter()  # the first evaluation, which torch's step includes too
        lbfgs = driver.lbfgs
        lbfgs.state.loss, _, _ = lbfgs.evaluate(0, [("copy", "trial", "x")], "g")
        first_eval = time.perf_counter() - began
        seconds, iterations, reached = 0.0, 0, None
        while iterations < max_iterations and reached is None:
            began = time.perf_counter()
            lbfgs.epoch(iterations)
            seconds += time.perf_counter() - began
            iterations = lbfgs.state.n_iter
            if lbfgs.state.loss <= target:
                reached = seconds
        return {"iterations": iterations, "seconds": seconds, "loss": lbfgs.state.loss,
                "reached_s": reached, "first_eval_s": first_eval, "startup_s": started,
                "evaluations": lbfgs.state.func_evals}
    finally:
        driver.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from cluster.connect import LOCAL_SYSTEM_CONFIG, quiet_ray_logs
    from pipelines import data as datasets

    workdir = Path(tempfile.mkdtemp(prefix="raydeep-lbfgs-bench-"))
    run = run_config(args, f"sqlite:///{workdir / 'mlflow.db'}")
    data = datasets.load(run.data, run.seed)
    from pipelines.training.loop import build_model

    params = sum(p.numel() for p in build_model(run, data).parameters())
    print(f"data: {len(data.y_train)} training examples of shape {list(data.input_shape)}; "
          f"mlp width {args.width} depth {args.depth} ({params:,} parameters)", flush=True)

    reference = torch_side(run, data, args.iterations, args.torch_threads or args.workers)
    print(f"torch: {reference['iterations']} iterations in {reference['seconds']:.2f} s, "
          f"loss {reference['loss']:.5f}", flush=True)

    quiet_ray_logs()
    ray.init(num_cpus=args.num_cpus, _system_config=LOCAL_SYSTEM_CONFIG, include_dashboard=False)
    try:
        ours = raydeep_side(run, data, reference["loss"], 2 * args.iterations, workdir)
    finally:
        ray.shutdown()
    portions = run.strategy.options.portions_for(run)
    print(f"raydeep: actors started in {ours['startup_s']:.2f} s, first evaluation "
          f"{ours['first_eval_s']:.2f} s (not counted below)\n")

    rows = [("torch.optim.LBFGS (1 process, "
             f"{args.torch_threads or args.workers} threads)", reference, reference["seconds"]),
            (f"raydeep lbfgs (W={args.workers}, S={args.shards}, P={portions})", ours, ours["reached_s"])]
    print(f"| run | iterations | evaluations | iterations/s | final loss | time to loss {reference['loss']:.5f} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r, reached in rows:
        shown = f"{reached:.2f} s" if reached is not None else "not reached"
        print(f"| {name} | {r['iterations']} | {r['evaluations']} | {r['iterations'] / r['seconds']:.2f} "
              f"| {r['loss']:.5f} | {shown} |")
    rate = (ours["iterations"] / ours["seconds"]) / (reference["iterations"] / reference["seconds"])
    print(f"\nratio raydeep / torch: iterations/s {rate:.2f}", end="")
    if ours["reached_s"] is not None:
        print(f", time to the target loss {ours['reached_s'] / reference['seconds']:.2f}")
    else:
        print("; raydeep did not reach the target loss")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

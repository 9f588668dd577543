"""bf16 autocast against fp32 under every strategy that takes it, on the same model and data
(issue 19).

    python benchmarks/precision.py [--epochs 10 --repeats 3 --strategies local allreduce ps pipeline diloco]

In one run, on one embedded local Ray, each (strategy, precision) `--repeats` times,
interleaved so that a noisy minute hits every configuration alike. Printed per strategy, as
median [min-max] over the repeats: test accuracy in fp32 and bf16, their difference (the
issue's goal: within 0.5 points), and samples/s of the last epoch in each precision.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from local_sgd import spread  # noqa: E402  (sibling scripts)
from param_server import run_config  # noqa: E402

EXTRA = {"pipeline": {"strategy.stages": 2, "strategy.microbatches": 4}, "ps": {"strategy.staleness": 0}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--strategies", nargs="+", default=["local", "allreduce", "ps", "pipeline", "diloco"])
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    import pipelines
    from cluster.connect import connect

    connect(num_cpus=args.num_cpus)  # the embedded Ray `raydeep run` starts
    root = Path(tempfile.mkdtemp(prefix="raydeep-precision-"))
    results = {(s, p): [] for s in args.strategies for p in ("fp32", "bf16")}
    for repeat in range(args.repeats):
        for strategy, precision in results:
            workdir = root / f"{strategy}-{precision}-{repeat}"
            workdir.mkdir()
            run = run_config(args, strategy, workdir, **{"optim.precision": precision, "tracking.figures": False,
                                                         **EXTRA.get(strategy, {})})
            result = pipelines.train(run)
            results[strategy, precision].append(
                {"accuracy": result.metrics["test_accuracy"],
                 "samples_per_s": result.history[-1].get("samples_per_s", float("nan"))})
    print(f"\n{args.model}, {args.workers} workers, {args.epochs} epochs, median [min-max] of {args.repeats}")
    print(f"{'strategy':<10} {'fp32 acc':>22} {'bf16 acc':>22} {'bf16-fp32 pts':>22} {'fp32 samples/s':>24} "
          f"{'bf16 samples/s':>24}")
    for strategy in args.strategies:
        a, b = results[strategy, "fp32"], results[strategy, "bf16"]
        gaps = [100 * (y["accuracy"] - x["accuracy"]) for x, y in zip(a, b)]
        print(f"{strategy:<10} {spread([r['accuracy'] for r in a], '.4f'):>22} "
              f"{spread([r['accuracy'] for r in b], '.4f'):>22} {spread(gaps, '+.2f'):>22} "
              f"{spread([r['samples_per_s'] for r in a], ',.0f'):>24} "
              f"{spread([r['samples_per_s'] for r in b], ',.0f'):>24}")


if __name__ == "__main__":
    main()

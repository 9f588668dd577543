"""What the default recipes give over several seeds: each (family, strategy) with no flags
but `--model` and `--strategy`, as issue 19's table asks (goals in `GOALS`).

    python benchmarks/recipes.py                                   # every row, seeds 0 1 2
    python benchmarks/recipes.py --rows mlp/local mlp/ps --seeds 0 1 2 3 4 --json out.json
    python benchmarks/recipes.py --rows mlp/local mlp/ps --set optim.precision=bf16

Each row is trained as `raydeep run --model FAMILY --strategy STRATEGY --seed S` trains it
(`config.load` lays the recipe), in one process on one embedded local Ray, the rows taking
turns seed by seed so that a noisy minute hits every row alike. A seed changes the split
(360 test images: one image is 0.28 points), the initial weights and the data order, so the
spread over seeds is the noise any one figure carries. Printed per row: the test figure's
median [min-max] and mean over the seeds, the goal, and the seconds one run took.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from local_sgd import spread  # noqa: E402  (sibling scripts)

GOALS = {"mlp": ("test_accuracy", 0.98), "cnn": ("test_accuracy", 0.99), "rnn": ("test_accuracy", 0.97),
         "sae": ("test_accuracy", 0.98), "dbn": ("test_accuracy", 0.98),
         "rbm": ("test_pseudo_likelihood", -14.2), "vae": ("test_elbo", -60.0)}
"""Issue 19's goal per family: the test metric and the figure it must reach."""
ROWS = ["mlp/local", "mlp/allreduce", "mlp/pipeline", "mlp/diloco", "mlp/lbfgs", "mlp/ps",
        "cnn/local", "rnn/local", "sae/local", "dbn/local", "rbm/local", "vae/local"]


def _row(text: str) -> str:
    family, _, strategy = text.partition("/")
    if family not in GOALS or not strategy:
        raise argparse.ArgumentTypeError(f"{text!r} is not FAMILY/STRATEGY with a family of {', '.join(GOALS)}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=ROWS, metavar="FAMILY/STRATEGY", type=_row)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--num-cpus", type=int, default=None, help="the embedded Ray's CPUs (default: as raydeep run)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="laid over every row's recipe, as `raydeep run --set` does (repeatable), "
                        "e.g. optim.precision=bf16")
    p.add_argument("--json", type=Path, help="write every run's figures here")
    args = p.parse_args(argv)
    from pipelines.errors import ConfigError

    for row in args.rows:  # an unknown strategy or a bad --set: one line, before Ray starts
        try:
            row_config(*row.split("/"), seed=0, store="sqlite:///unused.db", sets=args.sets)
        except (ConfigError, KeyError, ValueError) as error:
            p.error(f"{row}: {error.args[0] if isinstance(error, KeyError) else error}")  # KeyError quotes its str
    return args


def row_config(family: str, strategy: str, seed: int, store: str, sets: list[str] = ()):
    """The run `raydeep run --model FAMILY --strategy STRATEGY --seed S [--set ...]` trains."""
    from pipelines import config

    return config.load(overrides={"model.name": family, "strategy.name": strategy, "seed": seed,
                                  "tracking.uri": store, "tracking.log_model": False,
                                  "tracking.figures": False}, sets=list(sets))


def train_once(family: str, strategy: str, seed: int, store: str, sets: list[str] = ()) -> dict:
    import pipelines

    run = row_config(family, strategy, seed, store, sets)
    began = time.perf_counter()
    result = pipelines.train(run)
    metric = GOALS[family][0]
    return {"row": f"{family}/{strategy}", "seed": seed, "recipe": run.recipe or "none",
            metric: result.metrics[metric], "seconds": time.perf_counter() - began}


def against_local(row: str, means: dict[str, float]) -> str:
    """The row's mean minus its family's `local` mean, in points for an accuracy (issue 19:
    every strategy within 0.5 points of local), in the metric's units otherwise; blank for
    `local` itself or when its family's `local` row was not run. Both are means over the
    same seeds, so the splits they are tested on are the same."""
    family, strategy = row.split("/")
    local = means.get(f"{family}/local")
    if strategy == "local" or local is None:
        return ""
    difference = means[row] - local
    return f"{100 * difference:+.2f} pt" if GOALS[family][0].endswith("accuracy") else f"{difference:+.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    from cluster.connect import connect

    connect(num_cpus=args.num_cpus)
    workdir = Path(tempfile.mkdtemp(prefix="raydeep-recipes-"))
    os.chdir(workdir)  # each run's checkpoints and the store stay out of the caller's directory
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    runs = []
    for seed in args.seeds:
        for row in args.rows:
            family, strategy = row.split("/")
            runs.append(train_once(family, strategy, seed, store, args.sets))
            print(f"seed {seed} {row:<14} {runs[-1][GOALS[family][0]]:.4f}  ({runs[-1]['seconds']:.1f} s)",
                  flush=True)
    print(f"\nover seeds {', '.join(map(str, args.seeds))}: median [min-max], mean; the goal (issue 19)"
          + (f"; every row with --set {' --set '.join(args.sets)}" if args.sets else ""))
    print(f"{'row':<14} {'recipe':<16} {'metric':<22} {'median [min-max]':>26} {'mean':>8} {'goal':>7} "
          f"{'s/run':>6} {'vs local':>9}")
    means = {row: statistics.fmean(r[GOALS[row.split('/')[0]][0]] for r in runs if r["row"] == row)
             for row in args.rows}
    for row in args.rows:
        family = row.split("/")[0]
        metric, goal = GOALS[family]
        mine = [r for r in runs if r["row"] == row]
        mean = means[row]
        print(f"{row:<14} {mine[0]['recipe']:<16} {metric:<22} {spread([r[metric] for r in mine], '.4f'):>26} "
              f"{mean:>8.4f} {goal:>7g} {statistics.median(r['seconds'] for r in mine):>6.1f} "
              f"{against_local(row, means):>9}" + ("" if mean >= goal else "  (mean below the goal)"))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

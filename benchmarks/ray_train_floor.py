"""Ray Train's own floor: a plain `TorchTrainer` whose workers do nothing but one allreduce.

    python benchmarks/ray_train_floor.py [--repeats 3] [--workers 2]

Each repeat is a fresh Python process, as `raydeep run` is: it imports Ray and torch, starts an
embedded Ray the way raydeep does (`cluster.connect.connect`: its settings, Ray Train's
environment, the dashboard Ray Train's state API needs), then fits a `TorchTrainer` of
`--workers` 1-CPU gloo workers whose train function all-reduces one tensor and returns.
Printed per repeat and as medians [min-max]: seconds from the process's start to Ray being up,
and to the end of the first allreduce — the time raydeep's `allreduce` is compared with
(`benchmarks/startup.py`'s `first_step` for `allreduce`, also since its process started).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, os, sys, tempfile, time
began = time.time()
sys.path.insert(0, {repo!r})
import ray, torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from cluster.connect import connect
connect(num_cpus={workers}, dashboard=True)
ray_ready = time.time()
marks = tempfile.mkdtemp()

def train_fn(config):
    import torch.distributed as dist
    t = torch.ones(4)
    dist.all_reduce(t)
    with open(os.path.join(config["marks"], str(dist.get_rank())), "w") as f:
        f.write(str(time.time()))

TorchTrainer(train_fn, train_loop_config={{"marks": marks}},
             scaling_config=ScalingConfig(num_workers={workers}),
             run_config=RunConfig(storage_path=tempfile.mkdtemp())).fit()
first = max(float(open(os.path.join(marks, name)).read()) for name in os.listdir(marks))
print(json.dumps({{"ray_ready": ray_ready - began, "first_allreduce": first - began}}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    runs = []
    for repeat in range(args.repeats):
        code = CHILD.format(repo=str(HERE.parent), workers=args.workers)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=tempfile.mkdtemp(), timeout=600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"repeat {repeat + 1} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            return 1
        runs.append(json.loads(lines[-1]))
        print(f"[{repeat + 1}/{args.repeats}] ray up {runs[-1]['ray_ready']:.1f} s, first allreduce "
              f"{runs[-1]['first_allreduce']:.1f} s", flush=True)
    for key in ("ray_ready", "first_allreduce"):
        values = [r[key] for r in runs]
        print(f"  {key:<16} {statistics.median(values):5.1f} s  [{min(values):.1f} - {max(values):.1f}]"
              "  (seconds since the process started)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

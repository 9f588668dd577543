"""raydeep `pipeline` against torch.distributed.pipelining, same model, cut, batch and threads.

    python benchmarks/pipeline.py [--stages 2 --microbatches 8 --batch-size 256 --epochs 4]

In one run: raydeep `pipeline` (GPipe, 1F1B, ZB-H1, interleaved 1F1B with
`--virtual-stages` chunks per stage, and ZB-V with 2 in a V) on an embedded local Ray, then
`torch.distributed.pipelining` (`ScheduleGPipe`, `Schedule1F1B`, `ScheduleInterleavedZeroBubble`
with one stage per rank, `ScheduleInterleaved1F1B`, `ScheduleZBVZeroBubble`) under `torchrun` with
P processes over gloo, one torch thread per stage everywhere, on the same MLP (synthetic
1x32x32 inputs, 4 hidden layers of 1024), the same stage cut (raydeep's measured one) and
the same mini-batches. Printed per run: steady samples/s (epochs after the first) and
raydeep / torch; the schedule's compute-bound ideal, (M + (P-1)/V) x the slowest stage's
measured forward+backward on one micro-batch (V = 1 but interleaved: a stage's V chunks), and
the efficiency ideal/measured; raydeep's measured bubble per stage against (P-1)/(VM+P-1)
(ZB-V, which has no closed form: its simulated bubble with F = B = W, and the ideal
M x the slowest stage's cost / (1 - that bubble), the same form as the others');
and the overhead per stage operation, (measured step time - ideal step time) / (2 (VM+P-1))
operations on the critical path. Goals (reported,
not enforced): raydeep / torch >= 1.0, efficiency >= 0.9, overhead <= 0.5 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "zb-v"])
    p.add_argument("--virtual-stages", type=int, default=2, help="chunks per stage for interleaved-1f1b")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="mini-batches per epoch")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    return p.parse_args(argv)


def run_dict(args, workdir: Path, schedule: str) -> dict:
    return {"model": {"name": "mlp", "width": args.width, "depth": args.depth},
            "data": {"source": "synthetic", "synthetic_samples": 8192, "synthetic_shape": [1, 32, 32],
                     "batch_size": args.batch_size},
            "optim": {"epochs": args.epochs, "steps_per_epoch": args.steps, "lr": 0.01},
            "strategy": {"name": "pipeline", "stages": args.stages, "microbatches": args.microbatches,
                         "schedule": schedule, "virtual_stages": chunks(args, schedule)},
            "resources": {"storage_path": str(workdir / "runs")},
            "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "log_model": False}}


def chunks(args, schedule: str) -> int:
    from pipelines.strategies.pipeline_parallel.schedules import FIXED_CHUNKS, INTERLEAVED

    return args.virtual_stages if schedule in INTERLEAVED else FIXED_CHUNKS.get(schedule, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the stages run one thread each; measure the cut the same way
    import pipelines
    from cluster.connect import connect
    from pipelines import config
    from pipelines import data as datasets
    from pipelines.strategies.pipeline_parallel.actions import placement_of, stage_of
    from pipelines.strategies.pipeline_parallel.cut import cut
    from pipelines.strategies.pipeline_parallel.schedules import build
    from pipelines.training.loop import build_model

    connect(num_cpus=max(4, args.stages))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for schedule in args.schedules:
            raw = run_dict(args, workdir, schedule)
            cfg = config.from_dict(raw)
            data = datasets.load(cfg.data, cfg.seed)
            micro, v = args.batch_size // args.microbatches, chunks(args, schedule)
            the_cut = cut(build_model(cfg, data), "mlp", args.stages * v, data.x_train[:micro], virtual=v)
            result = pipelines.train(cfg)
            steady = result.history[1:] or result.history
            ours = float(np.mean([h["samples_per_s"] for h in steady]))
            bubbles = [float(np.mean([h[f"bubble_stage{s}"] for h in steady])) for s in range(args.stages)]
            raw["strategy"]["split"] = None
            spec = {"config": {**raw, "strategy": {"name": "local"}}, "bounds": the_cut.bounds,
                    "schedule": schedule, "microbatches": args.microbatches, "virtual_stages": v}
            theirs = run_torch(args, spec)
            # an actor's work per micro-batch: its chunks' (model stages s, s+P, ... or a V's)
            placement = placement_of(build(schedule, args.stages, args.microbatches, v))
            per_actor = [sum(the_cut.costs[stage_of(s, c, args.stages, placement)] for c in range(v))
                         for s in range(args.stages)]
            theory = result.history[-1]["bubble_theoretical"]  # (P-1)/(vM+P-1), or ZB-V's simulated
            ideal_step = args.microbatches * max(per_actor) / (1 - theory)
            measured_step = args.batch_size / ours
            operations = 2 * (v * args.microbatches + args.stages - 1)
            rows[schedule] = {
                "raydeep": ours, "torch": theirs, "ideal": args.batch_size / ideal_step,
                "bubbles": bubbles, "theory": theory,
                "overhead_ms": (measured_step - ideal_step) / operations * 1e3,
                "costs_ms": [c * 1e3 for c in per_actor]}
    print(f"\nmlp {args.depth}x{args.width} on 1x32x32, batch {args.batch_size}, P={args.stages}, "
          f"M={args.microbatches}; stage forward+backward per micro-batch (ms): "
          + ", ".join(f"{c:.2f}" for c in next(iter(rows.values()))["costs_ms"]))
    print(f"{'':<16} {'raydeep':>9} {'torch':>9} {'ratio':>6} {'ideal':>9} {'effic.':>7} "
          f"{'overhead/op':>12}  bubble per stage (theory)")
    for schedule, r in rows.items():
        print(f"{schedule:<16} {r['raydeep']:>9,.0f} {r['torch']:>9,.0f} {r['raydeep'] / r['torch']:>6.2f} "
              f"{r['ideal']:>9,.0f} {r['raydeep'] / r['ideal']:>7.2f} {r['overhead_ms']:>9.2f} ms  "
              + " ".join(f"{b:.3f}" for b in r["bubbles"]) + f" ({r['theory']:.3f})")
    return 0


def run_torch(args, spec: dict) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYDEEP_PIPELINING": json.dumps(spec)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.stages}",
         str(HERE / "torch_pipelining_reference.py")], env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"torch.distributed.pipelining run failed: {done.stderr.strip().splitlines()[-1:]}")
    rates = json.loads(lines[-1])["samples_per_s"]
    return float(np.mean(rates[1:] or rates))


if __name__ == "__main__":
    sys.exit(main())

"""Where should DiLoCo's pseudo-gradients be reduced? On the driver (what `diloco` does) or over
a gloo process group among the workers (as `allreduce` reduces gradients) (issue 22).

    python benchmarks/diloco_reduction.py [--sizes 85002 1000000 10000000 --rounds 20 --repeats 3]

One round, as each path would run it between two rounds of inner steps, for W workers
holding a pseudo-gradient of N float32 values:

- driver: every worker returns its pseudo-gradient through Ray's object store, the driver
  adds them in rank order (float64, as `diloco`'s driver) and steps the outer optimizer,
  and every worker takes the new parameters back (one `ray.put`, W reads);
- gloo: the workers all-gather the pseudo-gradients in a gloo group formed among them, each
  adds them in rank order and steps its own copy of the outer optimizer (identical bits on
  every worker), and nothing goes through the driver.

Printed per size: the median [min-max] over the repeats of the milliseconds per round, and
their ratio. Both paths run in the same Ray, alternating per repeat.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Reducer:
    """One worker's pseudo-gradient, and both ways of reducing it."""

    def __init__(self, size: int, rank: int):
        import torch

        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(rank)
        self.delta = torch.randn(size, generator=generator)
        self.theta = torch.zeros(size)
        self.rank = rank

    def address(self):
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, host: str, port: int, world: int) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=world,
                                timeout=timedelta(minutes=2))

    def pseudo_gradient(self):
        return self.delta.numpy()

    def take(self, theta) -> None:
        import torch

        self.theta.copy_(torch.from_numpy(theta))

    def gloo_rounds(self, rounds: int) -> float:
        """Seconds per round of all-gather, rank-order sum and a plain outer step."""
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(self.delta) for _ in range(dist.get_world_size())]
        dist.barrier()
        began = time.perf_counter()
        for _ in range(rounds):
            dist.all_gather(parts, self.delta)
            total = parts[0].double()
            for part in parts[1:]:
                total += part
            self.theta -= (0.7 * total / len(parts)).float()
        dist.barrier()
        return (time.perf_counter() - began) / rounds


def driver_rounds(ray, workers, rounds: int) -> float:
    import numpy as np

    theta = np.zeros_like(ray.get(workers[0].pseudo_gradient.remote()), dtype=np.float64)
    began = time.perf_counter()
    for _ in range(rounds):
        deltas = ray.get([w.pseudo_gradient.remote() for w in workers])
        total = deltas[0].astype(np.float64)
        for part in deltas[1:]:
            total += part
        theta -= 0.7 * total / len(deltas)
        ref = ray.put(theta.astype(np.float32))
        ray.get([w.take.remote(ref) for w in workers])
    return (time.perf_counter() - began) / rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[85_002, 1_000_000, 10_000_000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import ray

    from cluster.connect import connect

    connect(num_cpus=max(4, args.workers + 1))
    rows = []
    for size in args.sizes:
        workers = [ray.remote(Reducer).options(num_cpus=1).remote(size, rank) for rank in range(args.workers)]
        host, port = ray.get(workers[0].address.remote())
        ray.get([w.join.remote(host, port, args.workers) for w in workers])
        timings = {"driver": [], "gloo": []}
        for repeat in range(args.repeats):
            for path in (("driver", "gloo") if repeat % 2 == 0 else ("gloo", "driver")):
                if path == "driver":
                    timings[path].append(driver_rounds(ray, workers, args.rounds))
                else:
                    timings[path].append(max(ray.get([w.gloo_rounds.remote(args.rounds) for w in workers])))
        rows.append((size, timings))
        for w in workers:
            ray.kill(w)

    def spread(values):
        ms = [v * 1e3 for v in values]
        return f"{statistics.median(ms):.2f} [{min(ms):.2f}-{max(ms):.2f}]"

    print(f"\n{args.workers} workers, {args.rounds} rounds per repeat, median [min-max] of {args.repeats} repeats")
    print(f"{'values':>12} {'MB':>8} {'driver ms/round':>24} {'gloo ms/round':>24} {'driver/gloo':>12}")
    for size, t in rows:
        ratios = [d / g for d, g in zip(t["driver"], t["gloo"])]
        print(f"{size:>12,} {size * 4 / 1e6:>8.2f} {spread(t['driver']):>24} {spread(t['gloo']):>24} "
              f"{statistics.median(ratios):>12.2f}")


if __name__ == "__main__":
    main()

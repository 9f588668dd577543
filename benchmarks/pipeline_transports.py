"""Why `pipeline` moves activations with torch.distributed point-to-point: the transports compared.

    python benchmarks/pipeline_transports.py [--rows 32 --cols 1024 --repeats 300]

One activation-sized tensor (default 32 x 1024 float32, 128 KB: one micro-batch of the
pipeline benchmark's MLP) goes from stage actor A to stage actor B and back (the gradient),
`--repeats` times, over:

1. Ray actor calls (`b.echo.remote(a.echo.remote(x))`, the object store / inline path);
2. a Ray compiled graph (`ray.dag` + `experimental_compile()`, shared-memory channels on CPU);
3. torch.distributed gloo send/recv between the two actors (Ray only starts them).

Printed: the median round trip in ms for each. Every stage operation of a pipeline pays one
such hop, so this is the floor under the per-operation overhead.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Stage:
    def __init__(self):
        import torch

        torch.set_num_threads(1)

    def echo(self, x):
        return x

    def address(self):
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, host, port, rank):
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=2,
                                timeout=timedelta(minutes=2))

    def ping_pong(self, rows, cols, repeats, rank):
        import torch
        import torch.distributed as dist

        x = torch.randn(rows, cols)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
            times.append(time.perf_counter() - began)
        return times


def median_ms(times):
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args(argv)
    import ray
    import torch
    from ray.dag import InputNode

    from cluster.connect import connect

    connect(num_cpus=4)
    remote = ray.remote(Stage).options(num_cpus=1)
    x = torch.randn(args.rows, args.cols)
    results = {}

    a, b = remote.remote(), remote.remote()
    ray.get([a.echo.remote(0), b.echo.remote(0)])
    times = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        ray.get(a.echo.remote(b.echo.remote(x)))
        times.append(time.perf_counter() - began)
    results["Ray actor calls"] = median_ms(times)

    with InputNode() as inp:
        dag = a.echo.bind(b.echo.bind(inp))
    compiled = dag.experimental_compile()
    times = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        ray.get(compiled.execute(x))
        times.append(time.perf_counter() - began)
    compiled.teardown()
    results["Ray compiled graph"] = median_ms(times)

    c, d = remote.remote(), remote.remote()
    host, port = ray.get(c.address.remote())
    ray.get([c.join.remote(host, port, 0), d.join.remote(host, port, 1)])
    first, _ = ray.get([c.ping_pong.remote(args.rows, args.cols, args.repeats, 0),
                        d.ping_pong.remote(args.rows, args.cols, args.repeats, 1)])
    results["torch.distributed gloo"] = median_ms(first)

    size_kb = args.rows * args.cols * 4 / 1024
    print(f"\nround trip of a {args.rows}x{args.cols} float32 tensor ({size_kb:.0f} KB), median of {args.repeats}:")
    for name, ms in results.items():
        print(f"  {name:<24} {ms:6.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dense against Fastfood and circulant layers: time and parameter memory as d grows.

    python benchmarks/structured_layers.py [--sizes 256,512,...,8192 --batch 64 --repeats 7
                                            --threads 1 --out structured_layers.png]

For each d, one square d x d layer of each kind (`nn.Linear`, `FastfoodLinear`,
`CirculantLinear`) takes a forward and a backward pass (gradients of the parameters and of
the input, as inside a network) on a batch of random inputs. The time reported is the
median of --repeats passes after a warm-up; the three kinds are timed in turn within each
repeat, so a burst of load from other processes hits all of them alike. Memory is the
bytes of the learnable parameters (the fixed random buffers are shown apart).

The claim to confirm: structured layers cost O(d log d) time and O(d) memory against
O(d^2) for dense, so the printed log-log slopes should be near 1 against near 2; the goal
is that at d = 8192 both structured layers are at least 5x faster than dense. Threads are
pinned (--threads, default 1) so that the figures do not depend on what else the machine
runs. All sizes are measured in this one run; the plot goes to --out.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.structured import CirculantLinear, FastfoodLinear  # noqa: E402

KINDS = {"dense": nn.Linear, "fastfood": FastfoodLinear, "circulant": CirculantLinear}
GOAL = 5.0
"""Speed-up over dense that each structured layer should reach at the largest d."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(str(256 << i) for i in range(6)),
                   help="comma-separated layer sizes d (default 256,512,...,8192)")
    p.add_argument("--batch", type=int, default=64, help="examples per pass")
    p.add_argument("--repeats", type=int, default=7, help="timed passes per layer (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="structured_layers.png", help="where to save the plot")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not args.sizes or min(args.sizes) < 2 or args.repeats < 1 or args.batch < 1:
        p.error("need sizes >= 2, --repeats >= 1 and --batch >= 1")
    return args


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward and backward pass."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    began = time.perf_counter()
    layer(x).backward(grad)
    return time.perf_counter() - began


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(sizes, batch: int, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for d in sizes:
        layers = {kind: cls(d, d) for kind, cls in KINDS.items()}
        x = torch.randn(batch, d, requires_grad=True)
        grad = torch.randn(batch, d)
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for i in range(warmup + repeats):
            for kind, layer in layers.items():
                seconds = step(layer, x, grad)
                if i >= warmup:
                    times[kind].append(seconds)
        row = {"d": d}
        for kind, layer in layers.items():
            row[f"{kind}_ms"] = statistics.median(times[kind]) * 1e3
            row[f"{kind}_bytes"] = nbytes(layer.parameters())
            row[f"{kind}_buffer_bytes"] = nbytes(layer.buffers())
        rows.append(row)
        print(f"  d={d}: " + ", ".join(f"{k} {row[f'{k}_ms']:.2f} ms" for k in KINDS), flush=True)
        del layers
    return rows


def slope(rows: list[dict], key: str) -> float:
    """Least-squares exponent k of value ~ d^k over the measured sizes."""
    xs = [math.log(r["d"]) for r in rows]
    ys = [math.log(r[key]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def table(rows: list[dict]) -> str:
    head = (f"{'d':>6} | {'dense ms':>9} {'fastfood ms':>11} {'circ ms':>8} | {'x ff':>6} {'x circ':>7} | "
            f"{'dense B':>11} {'fastfood B':>10} {'circ B':>8} | {'x ff':>6} {'x circ':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['d']:>6} | {r['dense_ms']:>9.2f} {r['fastfood_ms']:>11.2f} {r['circulant_ms']:>8.2f} | "
            f"{r['dense_ms'] / r['fastfood_ms']:>6.1f} {r['dense_ms'] / r['circulant_ms']:>7.1f} | "
            f"{r['dense_bytes']:>11,} {r['fastfood_bytes']:>10,} {r['circulant_bytes']:>8,} | "
            f"{r['dense_bytes'] / r['fastfood_bytes']:>6.0f} {r['dense_bytes'] / r['circulant_bytes']:>7.0f}")
    return "\n".join(lines)


def plot(rows: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["d"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5))
    for kind, marker in zip(KINDS, "osd"):
        ax_t.plot(d, [r[f"{kind}_ms"] for r in rows], marker=marker, label=kind)
        ax_m.plot(d, [r[f"{kind}_bytes"] for r in rows], marker=marker, label=kind)
    # Guides through the first point of each curve family: d^2 for dense, d log d for the rest.
    first = rows[0]
    ax_t.plot(d, [first["dense_ms"] * (x / d[0]) ** 2 for x in d], "k:", lw=1, label="∝ d²")
    ax_t.plot(d, [first["circulant_ms"] * x * math.log(x) / (d[0] * math.log(d[0])) for x in d],
              "k--", lw=1, label="∝ d log d")
    ax_m.plot(d, [first["circulant_bytes"] * x / d[0] for x in d], "k--", lw=1, label="∝ d")
    for ax, ylabel in ((ax_t, "forward + backward, ms (median)"), (ax_m, "parameter bytes")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d (square d x d layer)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    setup = (f"batch {args.batch}, median of {args.repeats} passes after {args.warmup} warm-up, "
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
             f"on {os.cpu_count()} CPU(s), float32")
    print(f"structured layers: forward + backward of a square d x d layer; {setup}")
    load_before = os.getloadavg()[0]
    rows = measure(args.sizes, args.batch, args.repeats, args.warmup)
    load_after = os.getloadavg()[0]
    print()
    print(table(rows))
    print("(ms: median time; x ff / x circ: dense divided by Fastfood / circulant; "
          "B: bytes of learnable parameters)")
    last = rows[-1]
    print(f"fixed random buffers at d={last['d']}: Fastfood {last['fastfood_buffer_bytes']:,} B "
          f"(int64 permutation), circulant {last['circulant_buffer_bytes']:,} B (signs)")
    top = rows[len(rows) // 2:] if len(rows) >= 4 else rows
    for label, part in (("all sizes", rows), (f"d >= {top[0]['d']}", top)):
        print(f"log-log slope of time; memory over d, {label}: " + ", ".join(
            f"{k} {slope(part, f'{k}_ms'):.2f}; {slope(part, f'{k}_bytes'):.2f}" for k in KINDS))
    print("(expected: dense 2; structured about 1, d log d reading a little above 1 once the "
          "fixed cost per call, which flattens the small sizes, is amortised)")
    for kind in ("fastfood", "circulant"):
        ratio = last["dense_ms"] / last[f"{kind}_ms"]
        verdict = "met" if ratio >= GOAL else "NOT met"
        print(f"goal {kind} >= {GOAL:.0f}x faster than dense at d={last['d']}: {ratio:.1f}x, {verdict}")
    if max(load_before, load_after) > args.threads + 0.5:
        print(f"warning: load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs: "
              "other processes shared the machine; absolute times are inflated")
    plot(rows, args.out, f"dense vs structured layers ({setup})")
    print(f"plot: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

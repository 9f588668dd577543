"""raydeep `allreduce` (Ray Train TorchTrainer + DDP) against plain torchrun + DDP, same work.

    python benchmarks/allreduce_vs_ddp.py [--epochs 6 --samples 20000 --batch-size 128 --workers 2]

1. trains a CNN with raydeep's `allreduce` strategy through the Python API
   (`pipelines.train`) on an embedded local Ray, W workers of 1 CPU each, gloo;
   with --ray-plain, then also the torchrun side's training loop as a plain Ray Train
   `TorchTrainer` on the same Ray (a diagnostic: Ray's environment without raydeep's code);
2. shuts Ray down, then trains the same model on the same data with the same global batch,
   batch plan, optimizer and epochs under `torchrun --standalone --nproc_per_node W`
   (`benchmarks/ddp_reference.py`), gloo, one torch thread per process;
3. prints the steady-state throughput of each (mean samples/s of the epochs after the
   first, timed the same way inside the workers) and the best epoch, the ratio
   raydeep/torchrun, the time from submission to the end of the first optimizer step, and
   where the machine's CPU went during each run (training workers, our own overhead such as
   Ray's processes, and other processes: the machine may be shared, and the report warns
   when others took more than BUSY_WARN cores).

The project's goal is raydeep/torchrun >= 0.95. Exit status 0 whenever the runs complete
(the ratio is reported, not enforced); 1 if a run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL = 0.95
BUSY_WARN = 0.15
"""Cores that processes not ours may keep busy during a run before the report warns."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6, help="epochs (steady state: all but the first)")
    p.add_argument("--samples", type=int, default=20000,
                   help="synthetic examples in all (72%% of them form the training split)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--workers", type=int, default=2, help="data-parallel workers / torchrun processes")
    p.add_argument("--shape", default="1,16,16", help="synthetic input shape C,H,W")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the embedded Ray (default: --workers)")
    p.add_argument("--reference-loop", choices=("plain", "raydeep"), default="plain",
                   help="torchrun side: an independent textbook step loop (plain) or "
                        "pipelines.training.loop.train_epoch itself (raydeep)")
    p.add_argument("--ray-plain", action="store_true",
                   help="diagnostic third run: the torchrun side's training as a plain Ray Train "
                        "TorchTrainer (Ray's environment without raydeep's code)")
    p.add_argument("--skip-ray", action="store_true", help="run only the torchrun reference")
    p.add_argument("--workdir", default=None, help="keep run files here (default: a temp dir, removed)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is warm-up)")
    return args


def build_config(args: argparse.Namespace, workdir: Path):
    from pipelines import config

    shape = [int(s) for s in args.shape.split(",")]
    return config.load(overrides={
        "model.name": "cnn",
        "strategy.name": "allreduce",
        "resources.workers": args.workers,
        "resources.cpus_per_worker": 1.0,
        "data.source": "synthetic",
        "data.synthetic_samples": args.samples,
        "data.synthetic_shape": shape,
        "data.batch_size": args.batch_size,
        "optim.epochs": args.epochs,
        "seed": args.seed,
        "tracking.uri": f"sqlite:///{workdir / 'bench.db'}",
        "tracking.experiment": "allreduce_vs_ddp",
        "tracking.log_model": False,
        "resources.storage_path": str(workdir / "runs"),
    })


class CpuMonitor:
    """Where the machine's CPU goes during a run, sampled from /proc once a second.

    Splits the CPU-seconds of every process into three shares, reported in cores (CPU-seconds
    per second of the run):

    - `others`: processes that are not this benchmark's (not descendants of it). The machine
      may be shared; other work on the same cores skews the figures;
    - `workers`: the training processes (Ray Train workers, torchrun's worker processes);
    - `overhead`: everything else of ours: this driver, Ray's own processes, torchrun's agent.

    A process's CPU counts from its first sample (from 0 if it started during the run) to its
    last one, so processes that end before the run does are counted too.
    """

    INTERVAL_S = 1.0

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.me = os.getpid()
        self.ours: set[int] = set()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._sample(initial=True)
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._sample()

    def _sample(self, initial: bool = False) -> None:
        procs: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick)
        for pid in procs:  # ours: this process and its descendants
            chain, p = [], pid
            while p in procs and p not in self.ours and p != self.me and p > 1:
                chain.append(p)
                p = procs[p][0]
            if p == self.me or p in self.ours:
                self.ours.update(chain)
        for pid, (_, cpu) in procs.items():
            if pid not in self.first:
                self.first[pid] = cpu if initial else 0.0
            if self.kind.get(pid) != "workers":  # a pooled Ray worker is renamed when it is given work
                self.kind[pid] = self._classify(pid)
            self.last[pid] = cpu

    def _classify(self, pid: int) -> str:
        if pid != self.me and pid not in self.ours:
            return "others"
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "overhead"
        if cmdline.startswith("ray::RayTrainWorker") or (
                "ddp_reference.py" in cmdline and "torch.distributed.run" not in cmdline):
            return "workers"
        return "overhead"

    def stop(self) -> dict[str, float]:
        """Cores used by others, the training workers and our overhead since the start."""
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = max(time.perf_counter() - self.t0, 1e-9)
        used = {"others": 0.0, "workers": 0.0, "overhead": 0.0}
        for pid, cpu in self.last.items():
            used[self.kind[pid]] += max(cpu - self.first[pid], 0.0)
        return {k: v / wall for k, v in used.items()}


def wait_quiet(limit_s: float, window_s: float = 3.0) -> None:
    deadline = time.perf_counter() + limit_s
    while True:
        monitor = CpuMonitor()
        time.sleep(window_s)
        busy = monitor.stop()["others"]
        if busy <= BUSY_WARN:
            print(f"machine quiet (others use {busy:.2f} cores)", flush=True)
            return
        if time.perf_counter() >= deadline:
            print(f"machine still busy after {limit_s:.0f} s (others use {busy:.2f} cores); going on",
                  flush=True)
            return
        print(f"waiting for a quiet machine (others use {busy:.2f} cores)", flush=True)


def steady(history: list[dict]) -> float:
    later = [h["samples_per_s"] for h in history[1:]]
    return sum(later) / len(later)


def ray_worker_threads(num_cpus_per_worker: float = 1.0) -> dict:
    """What a 1-CPU Ray worker sees: OMP_NUM_THREADS and torch's intra-op thread count."""
    import ray

    @ray.remote(num_cpus=num_cpus_per_worker)
    def probe():
        import os as _os

        import torch as _torch

        return {"omp": _os.environ.get("OMP_NUM_THREADS"), "torch": _torch.get_num_threads()}

    return ray.get(probe.remote())


def run_raydeep(cfg, args: argparse.Namespace) -> dict:
    import ray

    import pipelines
    from cluster.connect import connect

    t0 = time.perf_counter()
    connect(num_cpus=args.num_cpus or args.workers)  # embedded local Ray, as the CLI starts it
    ray_start_s = time.perf_counter() - t0
    threads = ray_worker_threads(cfg.resources.cpus_per_worker)
    try:
        t1 = time.perf_counter()
        monitor = CpuMonitor()
        result = pipelines.train(cfg)
        cpu = monitor.stop()
        wall_s = time.perf_counter() - t1
        plain = run_ray_plain(cfg, args) if args.ray_plain else None
    finally:
        ray.shutdown()
    history = [{"epoch": i, "samples_per_s": h["samples_per_s"]} for i, h in enumerate(result.history)]
    return {
        "ray_plain": plain,
        "history": history,
        "steady_samples_per_s": steady(result.history),
        "time_to_first_step_s": result.metrics.get("time_to_first_step_s"),
        "ray_init_s": ray_start_s,
        "train_wall_s": wall_s,
        "cpu_cores": cpu,
        "worker_threads": threads,
        "test_accuracy": result.metrics.get("test_accuracy"),
    }


def run_ray_plain(cfg, args: argparse.Namespace) -> dict:
    """`ddp_reference.ray_train_worker` on a plain TorchTrainer, on the Ray already started."""
    import ddp_reference
    import ray
    import ray.cloudpickle
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines import data as datasets

    ray.cloudpickle.register_pickle_by_value(ddp_reference)  # workers need not find the module
    workdir = Path(cfg.resources.storage_path).parent
    out = workdir / "ray_plain_result.json"
    monitor = CpuMonitor()
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        ddp_reference.ray_train_worker,
        train_loop_config={"run": cfg.to_dict(), "data": ray.put(datasets.load(cfg.data, cfg.seed)),
                           "loop": args.reference_loop, "out": str(out), "submitted_at": time.time()},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers,
                                     resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
        run_config=TrainRunConfig(name="ray_plain", storage_path=str(workdir / "ray_plain_runs")),
    )
    fit = trainer.fit()
    if fit.error:
        raise fit.error
    result = json.loads(out.read_text())
    result["train_wall_s"] = time.perf_counter() - t0
    result["cpu_cores"] = monitor.stop()
    return result


def run_torchrun(cfg, args: argparse.Namespace, workdir: Path) -> dict:
    config_path, out_path = workdir / "run.json", workdir / "torchrun_result.json"
    config_path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = time.time()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(args.workers), str(HERE / "ddp_reference.py"),
               "--config", str(config_path), "--out", str(out_path),
               "--loop", args.reference_loop, "--launched-at", repr(launched)]
    t0 = time.perf_counter()
    monitor = CpuMonitor()
    subprocess.run(command, env=env, check=True)
    cpu = monitor.stop()
    wall_s = time.perf_counter() - t0
    result = json.loads(out_path.read_text())
    result["train_wall_s"] = wall_s
    result["cpu_cores"] = cpu
    return result


def pipelines_file() -> str:
    import pipelines

    return pipelines.__file__


def fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def report(cfg, args, data, ray_result: dict | None, torch_result: dict) -> str:
    from pipelines.training.loop import steps_per_epoch

    model = cfg.model.params
    w = args.workers
    steps = steps_per_epoch(len(data.y_train), cfg.data.batch_size, cfg.optim.steps_per_epoch)
    lines = [
        "configuration",
        f"  model          cnn channels={model.channels} kernel={model.kernel_size} pool={model.pool}"
        f"{model.pool_size} hidden={model.hidden} batch_norm={model.batch_norm} dropout={model.dropout}",
        f"  data           synthetic, {cfg.data.synthetic_samples} examples "
        f"({len(data.y_train)} train), input shape {list(data.input_shape)}, "
        f"{data.num_classes} classes",
        f"  batch          global {cfg.data.batch_size} = {w} workers x {cfg.data.batch_size // w}, "
        f"{steps} steps/epoch",
        f"  optimizer      {cfg.optim.name} lr={cfg.optim.lr} momentum={cfg.optim.momentum}",
        f"  epochs         {cfg.optim.epochs} (steady state: epochs 2..{cfg.optim.epochs})",
        f"  workers        {w} x 1 CPU, gloo; machine CPUs: {os.cpu_count()}",
        f"  code           pipelines from {Path(pipelines_file()).parent}",
    ]
    if ray_result:
        t = ray_result["worker_threads"]
        lines.append(f"  threads        raydeep worker: OMP_NUM_THREADS={t['omp']} torch={t['torch']};  "
                     f"torchrun process: OMP_NUM_THREADS={torch_result['omp_num_threads']} "
                     f"torch={torch_result['torch_threads']}")
    else:
        lines.append(f"  threads        torchrun process: OMP_NUM_THREADS={torch_result['omp_num_threads']} "
                     f"torch={torch_result['torch_threads']}")
    lines.append(f"  torchrun loop  {torch_result['loop']}")
    lines.append("")

    def epochs(result):
        return " ".join(f"{h['samples_per_s']:,.0f}" for h in result["history"])

    rows = []
    plain = ray_result.get("ray_plain") if ray_result else None
    if ray_result:
        rows.append(("raydeep allreduce (Ray Train + DDP)", ray_result))
    if plain:
        rows.append(("diagnostic: Ray Train + reference loop", plain))
    rows.append(("torchrun + DDP", torch_result))
    name_width = max(len(r[0]) for r in rows)
    lines.append(f"  {'':<{name_width}}  {'samples/s':>9}  {'best':>6}  {'first':>6}  {'wall':>6}  "
                 f"{'CPU cores used during the run':^24}")
    lines.append(f"  {'run':<{name_width}}  {'(steady)':>9}  {'epoch':>6}  {'step':>6}  {'':>6}  "
                 f"{'workers':>7} {'overhd':>7} {'others':>7}  per-epoch samples/s")
    for name, r in rows:
        cpu = r.get("cpu_cores") or {}
        best = max(h["samples_per_s"] for h in r["history"][1:])
        lines.append(f"  {name:<{name_width}}  {r['steady_samples_per_s']:>9,.0f}  {best:>6,.0f}  "
                     f"{fmt(r.get('time_to_first_step_s'), '.1f', 's'):>6}  "
                     f"{fmt(r.get('train_wall_s'), '.1f', 's'):>6}  "
                     f"{fmt(cpu.get('workers'), '.2f'):>7} {fmt(cpu.get('overhead'), '.2f'):>7} "
                     f"{fmt(cpu.get('others'), '.2f'):>7}  {epochs(r)}")
    lines.append("")
    if ray_result:
        ratio = ray_result["steady_samples_per_s"] / torch_result["steady_samples_per_s"]
        verdict = "meets" if ratio >= GOAL else "misses"
        best_ratio = (max(h["samples_per_s"] for h in ray_result["history"][1:])
                      / max(h["samples_per_s"] for h in torch_result["history"][1:]))
        lines.append(f"  raydeep / torchrun samples/s   {ratio:.3f}   ({verdict} the goal >= {GOAL}); "
                     f"best epoch against best epoch: {best_ratio:.3f}")
        if plain:
            lines.append(f"  diagnostic: Ray Train + reference loop / torchrun  "
                         f"{plain['steady_samples_per_s'] / torch_result['steady_samples_per_s']:.3f};  "
                         f"raydeep / Ray Train + reference loop  "
                         f"{ray_result['steady_samples_per_s'] / plain['steady_samples_per_s']:.3f}")
        lines.append(f"  raydeep time to first step     {fmt(ray_result['time_to_first_step_s'], '.1f', ' s')}"
                     f"   (pipelines.train called -> end of first optimizer step; Ray started "
                     f"{ray_result['ray_init_s']:.1f} s before, not counted)")
    busy = max((r.get("cpu_cores") or {}).get("others", 0.0) for _, r in rows)
    if busy > BUSY_WARN:
        lines.append(f"  WARNING: other processes on this machine kept {busy:.2f} cores busy during a run; "
                     "the figures are skewed, rerun on a quiet machine")
    lines.append("  samples/s: global examples stepped / mean per-worker wall time of the epoch's steps; "
                 "steady: mean of epochs 2..N, best: the fastest of them")
    lines.append("  first step: from trainer submission (Ray rows) or torchrun launch to the end of the "
                 "first optimizer step; wall: the whole run")
    lines.append("  CPU: cores kept busy during the run by the training processes (workers), by the rest "
                 "of ours (overhd: driver, Ray's processes, torchrun's agent) and by other processes")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="allreduce_vs_ddp-")
        workdir = Path(tmp.name)
    try:
        from pipelines import data as datasets

        cfg = build_config(args, workdir)
        data = datasets.load(cfg.data, cfg.seed)
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        ray_result = None
        if not args.skip_ray:
            print(f"== raydeep allreduce: {args.workers} Ray Train workers", flush=True)
            ray_result = run_raydeep(cfg, args)
        print(f"== torchrun --standalone --nproc_per_node {args.workers}", flush=True)
        torch_result = run_torchrun(cfg, args, workdir)
        text = report(cfg, args, data, ray_result, torch_result)
        print("\n" + text, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"raydeep": ray_result, "torchrun": torch_result, "config": cfg.to_dict()}, indent=1))
    except Exception as e:  # noqa: BLE001 - report and fail
        traceback.print_exc()
        print(f"benchmark failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

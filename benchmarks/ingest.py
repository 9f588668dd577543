"""Streaming a Parquet table larger than one process should hold, side by side (issue 17).

For each table size, in one run, each a fresh process with its own embedded Ray:
- `stream`:     raydeep allreduce (2 workers) with `--stream` (Ray Data, `get_dataset_shard`);
- `memory`:     the same run reading the table whole (sizes up to `--memory-up-to` GB: the
                in-memory path holds several copies, and a large one would not fit);
- `documented`: the pattern Ray's documentation gives, `TorchTrainer(datasets={"train":
                ray.data.read_parquet(dir)})` and `iter_torch_batches` in 2 workers, with
                the same model, batch and epochs (features stacked from their columns).

Printed per run: training samples/s, time to the first batch or step, and the peak RSS of
every process of the run (the driver, Ray's own, each worker and each Ray Data task's),
read from /proc every 0.2 s: the largest per kind and their sum at its highest. Each run
takes `--steps` steps of one epoch: streamed, the table is read as far as they need; read
whole, it is loaded first (what the memory columns show).

    python benchmarks/ingest.py --sizes 0.5 2 --repeats 3
    python benchmarks/ingest.py --sizes 0.5 --kinds stream memory --steps 1500 6000
    python benchmarks/ingest.py --sizes 0.5 2 --where local s3 --steps 1500 6000
    python benchmarks/ingest.py --sizes 0.5 --kinds stream memory --steps 0   # whole epochs

`--where s3` reads the same files from a bucket on moto's S3 server (a real HTTP server
speaking the S3 API, its own process on a free local port), through the `s3://` URI a
user gives `--data` (credentials and endpoint in the URI, as `--storage-path` takes them).

With two step counts each kind also gets its steady-state rate (`steady_state`): the
difference of two epochs of different lengths leaves out what an epoch spends before its
data flows, which a short run is mostly made of.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from local_sgd import spread  # noqa: E402  (a sibling script: median [min-max])
from s3_server import moto_bucket  # noqa: E402  (a sibling: moto's S3 server)

COLUMNS = 64
ROWS_PER_FILE = 500_000


def write_table(root: Path, gigabytes: float) -> Path:
    """Float32 feature columns and a 10-class label that a linear model separates well."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = int(gigabytes * 2**30 / (4 * COLUMNS))
    directory = root / f"table-{gigabytes:g}gb"
    if directory.exists():
        return directory
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(COLUMNS, 10)).astype(np.float32)
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        x = rng.normal(size=(n, COLUMNS)).astype(np.float32)
        label = (x @ weights + rng.normal(size=(n, 10)).astype(np.float32)).argmax(axis=1)
        pq.write_table(pa.table({**{f"f{j}": x[:, j] for j in range(COLUMNS)}, "label": label}),
                       directory / f"part-{i:04d}.parquet")
    return directory


class PeakRss:
    """The peak resident memory of a process tree, per process, sampled from /proc: all of
    it (VmRSS, which counts the object store's shared pages a process has touched) and its
    private part (RssAnon: the process's own heap, what grows if a process holds the data)."""

    def __init__(self, root_pid: int):
        self.root, self.peaks, self.private, self.total = root_pid, {}, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, stack = [], [self.root]
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(children.get(pid, []))
        return found

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            total = 0
            for pid in self._tree():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
                          if line.startswith(("VmRSS:", "RssAnon:"))}
                rss = fields.get("VmRSS", 0)
                total += rss
                key = (pid, _kind(name))
                self.peaks[key] = max(self.peaks.get(key, 0), rss)
                self.private[key] = max(self.private.get(key, 0), fields.get("RssAnon", 0))
            self.total = max(self.total, total)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        by_kind: dict[str, int] = {}
        for (_, kind), rss in self.peaks.items():
            by_kind[kind] = max(by_kind.get(kind, 0), rss)
        for (_, kind), rss in self.private.items():
            by_kind[f"{kind} private"] = max(by_kind.get(f"{kind} private", 0), rss)
        return {**{k: v / 2**20 for k, v in sorted(by_kind.items())}, "sum_at_peak": self.total / 2**20}


def _kind(cmdline: str) -> str:
    for marker, kind in (("RayTrainWorker", "train_worker"), ("SplitCoordinator", "split_coordinator"),
                         ("ReadFiles", "data_task"), ("MapBatches", "data_task"), ("ray::IDLE", "idle_worker"),
                         ("raylet", "ray_system"), ("gcs_server", "ray_system"), ("dashboard", "ray_system"),
                         ("log_monitor", "ray_system"), ("ray::", "other_actor")):
        if marker in cmdline:
            return kind
    return "driver" if "cluster.cli" in cmdline or "ingest.py" in cmdline else "other"


DOCUMENTED = r'''
import json, sys, time
started = time.time()
import ray, ray.data, ray.train, torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

def loop(config):
    import ray.train.torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shard = ray.train.get_dataset_shard("train")
    seen, began, first = 0, time.time(), None
    for step, batch in enumerate(shard.iter_torch_batches(batch_size=config["batch"], drop_last=True)):
        if step == config["steps"]:
            break
        x = torch.stack([batch[f"f{j}"] for j in range(64)], dim=1)
        loss = torch.nn.functional.cross_entropy(model(x), batch["label"])
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        seen += len(x)
        first = first or time.time()
    if ray.train.get_context().get_world_rank() == 0:  # Ray Train V2 keeps metrics with checkpoints only
        print("RESULT " + json.dumps({"samples_per_s": ray.train.get_context().get_world_size() * seen
                                      / (time.time() - began), "first_step_s": first - config["started"]}))

ray.init(num_cpus=3, include_dashboard=False)
import pyarrow.fs
filesystem, path = pyarrow.fs.FileSystem.from_uri(sys.argv[1]) if "://" in sys.argv[1] else (None, sys.argv[1])
trainer = TorchTrainer(loop, train_loop_config={"batch": 32, "started": started, "steps": int(sys.argv[2])},
                       scaling_config=ScalingConfig(num_workers=2),
                       datasets={"train": ray.data.read_parquet(path, filesystem=filesystem)})
trainer.fit()
'''


@contextlib.contextmanager
def s3_copies():
    """A function that puts a table's files in a bucket of a moto S3 server started here
    and gives their `s3://` URI; the server stops on exit."""
    import pyarrow.fs

    with moto_bucket("bench") as (endpoint, fs):
        def upload(table: Path) -> str:
            for path in sorted(table.glob("*.parquet")):
                pyarrow.fs.copy_files(str(path), f"bench/{table.name}/{path.name}",
                                      destination_filesystem=fs)
            return f"s3://k:s@bench/{table.name}/?endpoint_override={endpoint}&scheme=http&region=us-east-1"

        yield upload


def run_one(kind: str, table: str, workdir: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kind == "documented":
        command = [sys.executable, "-c", DOCUMENTED, str(table), str(steps)]
    else:
        command = [sys.executable, "-m", "cluster.cli", "run", "--strategy", "allreduce", "--data", str(table),
                   "--epochs", "1", "--set", "model.width=64", "--set", "data.val_fraction=0.01",
                   "--set", "data.test_fraction=0.01", "--set", "tracking.log_model=false",
                   "--set", "tracking.figures=false", *(["--set", f"optim.steps_per_epoch={steps}"] if steps else []),
                   "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                   "--storage-path", str(workdir / "runs"), *(["--stream"] if kind == "stream" else [])]
    began = time.time()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    sampler = PeakRss(process.pid)
    output, _ = process.communicate()
    memory = sampler.stop()
    if process.returncode != 0:
        return {"failed": output.strip().splitlines()[-1] if output.strip() else f"exit {process.returncode}"}
    result = {"wall_s": time.time() - began, "rss_mib": memory}
    if kind == "documented":
        line = next(line for line in output.splitlines() if "RESULT " in line)
        result.update(json.loads(line[line.index("RESULT ") + 7:]))
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name("raydeep").experiment_id],
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        result.update(samples_per_s=run.data.metrics["samples_per_s"],
                      first_step_s=run.data.metrics["time_to_first_step_s"])
    return result


GLOBAL_BATCH = 64
"""Rows per optimizer step in every kind: raydeep's `data.batch_size`, the documented
pattern's 32 per worker on 2 workers."""


def steady_state(short: dict, long: dict, steps: tuple[int, int]) -> tuple[float, float]:
    """(samples/s once the data flows, seconds the epoch spends before it does) from two runs
    of one kind that differ only in their step count: an epoch's time is a fixed start (the
    first block's read and preparation, the workers' first batch) plus its steps at the
    steady rate, so the difference of two epochs is steps at that rate alone."""
    (s1, s2), (r1, r2) = steps, (short["samples_per_s"], long["samples_per_s"])
    t1, t2 = s1 * GLOBAL_BATCH / r1, s2 * GLOBAL_BATCH / r2
    rate = (s2 - s1) * GLOBAL_BATCH / (t2 - t1) if t2 > t1 else float("inf")
    return rate, t1 - s1 * GLOBAL_BATCH / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0], help="table sizes, GB of float32")
    parser.add_argument("--memory-up-to", type=float, default=0.5, help="largest size read in memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["stream", "memory", "documented"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1500],
                        help="optimizer steps per run (64 rows each): the table is read as far as they "
                             "take (0: the whole epoch); two counts (e.g. 1500 6000) also give each kind's "
                             "steady-state rate")
    parser.add_argument("--dir", default=None, help="where the tables are written (default: a temp dir)")
    parser.add_argument("--where", nargs="+", choices=["local", "s3"], default=["local"],
                        help="the tables' files on local disk, and/or on a moto S3 server's bucket")
    args = parser.parse_args()
    if len(args.steps) > 2 or len(set(args.steps)) != len(args.steps) or (len(args.steps) == 2 and 0 in args.steps):
        parser.error("--steps takes one count (0: a whole epoch), or two different ones")
    if 0 in args.steps and "documented" in args.kinds:
        parser.error("--steps 0 (a whole epoch) is for raydeep's kinds: the documented loop counts its steps")
    root = Path(args.dir or tempfile.mkdtemp(prefix="raydeep-ingest-"))
    with contextlib.ExitStack() as stack:
        upload = stack.enter_context(s3_copies()) if "s3" in args.where else None
        for size in args.sizes:
            table = write_table(root, size)
            for where in args.where:
                source = str(table) if where == "local" else upload(table)
                measure(f"{size:g} GB {where:<5}", source, root / f"{where}-{size:g}", args,
                        [k for k in args.kinds if not (k == "memory" and size > args.memory_up_to)])


def measure(title: str, source: str, root: Path, args, kinds: list[str]) -> None:
    results: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):  # kinds and step counts take turns within a repeat
        for steps in args.steps:
            for kind in kinds:
                workdir = root / f"{kind}-{steps}-{repeat}"
                workdir.mkdir(parents=True, exist_ok=True)
                results.setdefault((kind, steps), []).append(run_one(kind, source, workdir, steps))
    for (kind, steps), runs in results.items():
        failed = [r["failed"] for r in runs if "failed" in r]
        if failed:
            print(f"{title} {kind:<10} {_steps(steps)} FAILED: {failed[0]}")
            continue
        peak = {k: max(r["rss_mib"].get(k, 0) for r in runs) for k in runs[0]["rss_mib"]}
        print(f"{title} {kind:<10} {_steps(steps)}  samples/s {spread([r['samples_per_s'] for r in runs], ',.0f')}"
              f"  first step {statistics.median(r['first_step_s'] for r in runs):.1f} s  peak RSS MiB: "
              + ", ".join(f"{k} {v:,.0f}" for k, v in peak.items()), flush=True)
    if len(args.steps) == 2:
        report_steady_state(title, kinds, results, tuple(args.steps))


def _steps(steps: int) -> str:
    return f"{steps} steps" if steps else "a whole epoch"


def report_steady_state(title: str, kinds: list[str], results: dict, steps: tuple[int, int]) -> None:
    steady = {}
    for kind in kinds:
        pairs = list(zip(results[(kind, steps[0])], results[(kind, steps[1])]))
        if any("failed" in a or "failed" in b for a, b in pairs):
            continue
        steady[kind] = [steady_state(a, b, steps) for a, b in pairs]
        print(f"{title} {kind:<10} steady state ({steps[0]} -> {steps[1]} steps): samples/s "
              f"{spread([rate for rate, _ in steady[kind]], ',.0f')}, before the data flows "
              f"{spread([fixed for _, fixed in steady[kind]], '.1f')} s", flush=True)
    for other in ("memory", "documented"):
        if "stream" in steady and other in steady:  # repeat by repeat: runs close in time
            ratios = [a[0] / b[0] for a, b in zip(steady["stream"], steady[other])]
            print(f"{title} steady-state stream / {other}: {spread(ratios, '.2f')}")


if __name__ == "__main__":
    main()

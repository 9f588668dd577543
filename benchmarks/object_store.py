"""What keeping runs on an object store costs per checkpoint, against a local directory.

Starts moto's S3 server on a free local port (an HTTP server speaking the S3 API; a real
bucket adds the network's latency and bandwidth on top) and, for checkpoints of a few
sizes, times in one run: writing the checkpoint locally, uploading it
(`RunDir.upload_checkpoint`, pruning included), reading the newest state back straight
from the store (`storage.newest_state`, what allreduce workers do) and downloading it
(what `--resume` does).

    .venv/bin/python benchmarks/object_store.py [--sizes-mb 1 10 50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from s3_server import moto_bucket  # noqa: E402  (a sibling: moto's S3 server)

from pipelines.storage import RunDir, checkpoint_name, newest_state, save_state  # noqa: E402


def timed(action) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with moto_bucket("bench") as (endpoint, _):
        print(f"{'size':>6} {'local save':>11} {'upload':>8} {'load newest':>12} {'download':>9}   (median ms)")
        for mb in args.sizes_mb:
            uri = (f"s3://k:s@bench/{mb}mb?endpoint_override={endpoint}&scheme=http"
                   "&region=us-east-1")
            saves, uploads, loads, downloads = [], [], [], []
            with tempfile.TemporaryDirectory() as tmp:
                for epoch in range(args.repeats):
                    state = {"w": torch.randn(mb * (1 << 18))}  # float32: 4 bytes each
                    run_dir = RunDir(f"{mb}mb", Path(tmp), uri)
                    where = Path(tmp) / checkpoint_name(epoch)
                    saves.append(timed(lambda: save_state(where, epoch=epoch, model=state, optimizer={})))
                    uploads.append(timed(lambda: (run_dir.upload_checkpoint(where), run_dir.prune())))
                    loads.append(timed(lambda: newest_state(uri)))
                    into = RunDir(f"{mb}mb", Path(tmp) / f"download-{epoch}", uri)
                    into.local.mkdir()
                    downloads.append(timed(lambda: into.download([where.name])))
            print(f"{mb:>4}MB " + " ".join(f"{statistics.median(t) * 1000:>{w}.0f}" for t, w in
                                            ((saves, 11), (uploads, 8), (loads, 12), (downloads, 9))))


if __name__ == "__main__":
    main()

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

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

    import pyarrow.fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        pyarrow.fs.S3FileSystem(access_key="k", secret_key="s", region="us-east-1", scheme="http",
                                endpoint_override=f"127.0.0.1:{port}",
                                allow_bucket_creation=True).create_dir("bench")
        print(f"{'size':>6} {'local save':>11} {'upload':>8} {'load newest':>12} {'download':>9}   (median ms)")
        for mb in args.sizes_mb:
            uri = (f"s3://k:s@bench/{mb}mb?endpoint_override=127.0.0.1:{port}&scheme=http"
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
    finally:
        server.kill()


if __name__ == "__main__":
    main()

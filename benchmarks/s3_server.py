"""moto's S3 server for the benchmarks: an HTTP server speaking the S3 API, in its own
process on a free local port (a real bucket adds the network's latency and bandwidth)."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def moto_bucket(bucket: str):
    """(endpoint "127.0.0.1:PORT", pyarrow S3 filesystem with credentials k/s) once `bucket`
    exists on a fresh server; the server stops on exit."""
    import pyarrow.fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"127.0.0.1:{port}"
        fs = pyarrow.fs.S3FileSystem(access_key="k", secret_key="s", region="us-east-1", scheme="http",
                                     endpoint_override=endpoint, allow_bucket_creation=True)
        deadline = time.time() + 30
        while True:  # until the server answers
            try:
                fs.create_dir(bucket)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield endpoint, fs
    finally:
        server.kill()
        server.wait()
        log.close()

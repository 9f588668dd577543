"""What the tests share besides fixtures: running the CLI, small configs, killing actors."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it): two Rays, clusters or servers on
    one machine must not share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` different free ports: each socket stays bound until all are chosen (one
    `free_port` after another may be given the port just closed, and a Ray head refuses two
    of its components on one port)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def start_session_ray():
    """The session's local Ray (Ray Train needs 2 worker CPUs); a no-op when one runs."""
    import ray

    from cluster.connect import LOCAL_RAY_ENV, LOCAL_SYSTEM_CONFIG, quiet_ray_logs

    quiet_ray_logs()
    for key, value in LOCAL_RAY_ENV.items():  # as `raydeep run` sets up its embedded Ray
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        # The dashboard serves the state API the tests find actors with (`live_actor_pids`).
        # No idle workers started ahead of need: each burns about 0.01 core while it waits, and
        # the suite runs on two processes (pytest-xdist), each with a Ray of its own, for
        # minutes; every test's actors start their own processes anyway.
        ray.init(address="local", num_cpus=4, include_dashboard=True,
                 _system_config={**LOCAL_SYSTEM_CONFIG, "prestart_worker_first_driver": False,
                                 "enable_worker_prestart": False})
    return ray


def schema_defaults(args: tuple[str, ...], recipe: bool) -> list[str]:
    """A test's `raydeep run` trains with the schema's defaults (`--no-recipe`): its flags were
    chosen for them (a `--lr` for sgd), and strategies are compared on the same optimizer.
    Tests of the recipes themselves pass `recipe=True`."""
    args = list(args)
    if not recipe and args[:1] == ["run"]:
        args.insert(1, "--no-recipe")
    return args


def run_cli_process(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None,
                    recipe: bool = False) -> subprocess.CompletedProcess:
    """`raydeep ARGS` as a user would type it, in its own process (its own Ray, if any)."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *schema_defaults(args, recipe)], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def kill_process_tree(pid: int, timeout: float = 30) -> None:
    """SIGKILL process `pid`, its process group and every process descended from it, and
    wait until all are gone. Ray's workers run in process groups of their own: killing the
    group of a `raydeep` that started an embedded Ray kills its raylet, while a trial's
    worker goes on for as long as it takes to notice (seconds on a loaded machine), writing
    and pruning checkpoints in the run directory a resumed sweep is writing into."""
    import signal
    import time

    def children() -> dict[int, list[int]]:
        tree: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                tree.setdefault(ppid, []).append(int(entry))
        return tree

    tree, doomed, todo = children(), [], [pid]
    while todo:
        doomed.append(todo.pop())
        todo.extend(tree.get(doomed[-1], []))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for each in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)

    def alive(each: int) -> bool:
        try:
            return open(f"/proc/{each}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(each) for each in doomed if each != pid):
        time.sleep(0.05)


def run_cli(*args: str, cwd: Path, recipe: bool = False, **_) -> subprocess.CompletedProcess:
    """`raydeep ARGS` through the console script's own entry point, in this process: what it
    prints and its exit code, without a new interpreter importing torch, MLflow and Ray
    again (seconds per call). A run that needs Ray joins the session's; tests that start
    one this way must ask for the `ray_session` fixture first."""
    from cluster import cli

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    # Progress lines go to the process's own stdout (sys.__stdout__): capture those too.
    real_stdout = sys.__stdout__
    os.chdir(cwd)
    try:
        sys.__stdout__ = out
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(schema_defaults(args, recipe))
    finally:
        sys.__stdout__ = real_stdout
        os.chdir(here)
    return subprocess.CompletedProcess(["raydeep", *args], code, out.getvalue(), err.getvalue())


def small_run(**overrides):
    """A run config for tests: digits, few epochs, no model artifact and no figures unless
    asked (drawing them is most of a short local run's time)."""
    from pipelines import config

    base = {"strategy.name": "local", "optim.epochs": 2, "tracking.log_model": False,
            "tracking.figures": False, "recipe": False}  # the schema's defaults (`schema_defaults`)
    base.update(overrides)
    return config.load(overrides=base)


def live_actor_pids(ray, name_part: str | None = None, class_name: str | None = None) -> list[int]:
    """Pids of this session's live actors whose name contains `name_part` (or of a class)."""
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] + ([("class_name", "=", class_name)] if class_name else [])
    # Name this session's cluster: other Ray instances may run on the same machine.
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=filters)
    return [a.pid for a in actors if a.pid and (name_part is None or (a.name and name_part in a.name))]


class TrainingInBackground:
    """`pipelines.train(cfg)` in a thread, so that a test can act on the run while it trains."""

    def __init__(self, cfg):
        import threading

        import pipelines

        self.cfg, self.outcome = cfg, {}
        self.thread = threading.Thread(target=lambda: self.outcome.update(result=pipelines.train(cfg)))
        self.thread.start()

    def wait_for_checkpoint(self, workdir: Path, epoch: int, timeout: float = 300, bucket=None) -> None:
        """Until the run has saved epoch `epoch` (0-based) under `workdir`'s raydeep_runs/
        (or, given `moto_bucket`'s (uri, filesystem), on that bucket); it must still be running then."""
        import time

        from pipelines.storage import checkpoint_name

        name = checkpoint_name(epoch)
        if bucket is None:
            saved = (workdir / "raydeep_runs" / self.cfg.tracking.run_name / name).exists
        else:
            saved = lambda: name in bucket_listing(bucket[1], f"runs/raydeep/{self.cfg.tracking.run_name}")  # noqa: E731
        deadline = time.time() + timeout
        while not saved() and self.thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        assert saved() and self.thread.is_alive(), "the run ended before the test could act"

    def result(self):
        self.thread.join(timeout=600)
        assert "result" in self.outcome, "the run did not finish"
        return self.outcome["result"]


def train_and_kill(cfg, ray, workdir: Path, name_part: str):
    """Train `cfg`, SIGKILL the actor named `:RUN_NAME:name_part*` once the run's second
    checkpoint exists, and return the run's result."""
    import signal

    training = TrainingInBackground(cfg)
    training.wait_for_checkpoint(workdir, 1)
    pids = live_actor_pids(ray, f":{cfg.tracking.run_name}:{name_part}")
    assert pids, f"no live actor named *{name_part}*"
    os.kill(pids[0], signal.SIGKILL)
    return training.result()


@contextlib.contextmanager
def moto_bucket(log_dir: Path):
    """`s3://...` of a fresh bucket `runs` on a moto S3 server (a real HTTP server speaking
    the S3 API, in its own process on a free port); yields (uri, pyarrow filesystem).

    The credentials travel in the URI (`s3://KEY:SECRET@bucket/...`): the session's Ray
    workers were started before the server and do not see variables set for it."""
    import time

    import pyarrow.fs
    import requests

    port = free_port()
    log = open(log_dir / "moto_server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.2)
        fs = pyarrow.fs.S3FileSystem(access_key="test", secret_key="test", region="us-east-1",
                                     endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                     allow_bucket_creation=True)
        fs.create_dir("runs")
        yield f"s3://test:test@runs/raydeep?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", fs
    finally:
        server.kill()
        server.wait()
        log.close()


def bucket_listing(fs, path: str) -> list[str]:
    """The names directly under `path` on a pyarrow filesystem (none if it is not there)."""
    import pyarrow.fs

    return sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)))


def digits_table(root: Path, parts: int = 4) -> Path:
    """The bundled digits as a directory of Parquet files: 64 pixel columns and a label."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import split

    pixels, labels = split.digits()
    root = root / "digits"
    root.mkdir()
    bounds = np.linspace(0, len(labels), parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        columns = {f"p{j}": (pixels[a:b, j] / 16.0).astype(np.float32) for j in range(pixels.shape[1])}
        pq.write_table(pa.table({**columns, "label": labels[a:b].astype(np.int64)}), root / f"part-{i}.parquet")
    return root


def float32_iterate_tolerance(reference, iteration: int, terms: int) -> float:
    """How far two float32 L-BFGS runs that sum their dot products in different orders may
    drift apart by `iteration`, from the standard error bound, not from a measurement.

    A float32 dot product of n terms is off by at most gamma_n * sum|a_i b_i|, gamma_n =
    n u / (1 - n u), u = 2**-24 (Higham, Accuracy and Stability, 3.1); two summation orders
    of the same dot differ by at most twice that. Every scalar of an L-BFGS iteration (rho,
    alpha, beta, H_diag, g.d) is a ratio of such dots, so to first order each iteration moves
    x with a relative error of a few gamma_n, and these add over iterations. Allowed: 2 gamma_n
    per dot for the (at most) 4 dots an iteration's direction and step depend on most
    directly, summed over the iterations, relative to the largest weight. A wrong sign,
    history pair or step is off by O(|x|), far above this.
    """
    u = 2.0 ** -24
    gamma = terms * u / (1 - terms * u)
    return iteration * 4 * 2 * gamma * float(reference.abs().max())

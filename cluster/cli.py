"""The `raydeep` command line: run, tune, submit, jobs, ui, models, strategies.

Bad input gets one line on stderr and exit code 2; a run that fails after it started is
marked FAILED in MLflow and exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Sequence

_IMPORTED_AT = [time.time()]
"""When this process imported the CLI, which its first command takes as its start."""


def _launch_time() -> float:
    """When this command started: the origin of a run's start-up timeline (time to first
    step). A second command in the same process (tests, notebooks) starts when it is called."""
    return _IMPORTED_AT.pop() if _IMPORTED_AT else time.time()

from cluster.flags import FLAG_ALIASES, RUN_FLAGS  # noqa: E402 (after the launch clock)


class UsageError(Exception):
    """Bad usage of the command line: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line instead of a usage block."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> Parser:
    parser = Parser(prog="raydeep", description="Distributed deep learning on Ray, tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", parser_class=Parser, required=True)

    run = commands.add_parser("run", help="train a model with a strategy")
    run.add_argument("config", nargs="?", help="a run config YAML (flags and --set override it)")
    for flag, key in RUN_FLAGS.items():
        run.add_argument(flag, *FLAG_ALIASES.get(flag, []), dest=key, metavar=key.split(".")[-1].upper(),
                         help=f"sets {key}", **_switch(flag))
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set optim.lr=0.05 (repeatable)")
    run.add_argument("--print-schedule", action="store_true",
                     help="pipeline: print the schedule as a grid and exit without training")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_NAME",
                     help="continue a run from its last checkpoint (default: the newest run)")
    run.add_argument("--no-recipe", action="store_true", help="the schema's defaults, not the family's recipe")
    run.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own log lines")

    tune = commands.add_parser("tune", help="sweep a tune_configs/*.yaml file with Ray Tune")
    tune.add_argument("config", help="a sweep file: base run config, search space, metric, scheduler")
    for flag, key in RUN_FLAGS.items():
        tune.add_argument(flag, *FLAG_ALIASES.get(flag, []), dest=key, metavar=key.split(".")[-1].upper(),
                          help=f"sets base {key}", **_switch(flag))
    tune.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override any key of the base config (repeatable)")
    tune.add_argument("--samples", type=int, help="draws of the search space (default: the file's)")
    tune.add_argument("--scheduler", help="fifo, asha or pbt (default: the file's)")
    tune.add_argument("--search", help="random or optuna (default: the file's)")
    tune.add_argument("--max-concurrent", type=int,
                      help="trials at once (default: as many as the cluster's resources hold)")
    tune.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP",
                      help="finish an interrupted sweep (default: the newest sweep of this file)")
    tune.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own log lines")

    submit = commands.add_parser("submit", help="run a raydeep command on a Ray cluster as a job")
    submit.add_argument("--address", help="the cluster's Jobs server (default: RAY_ADDRESS or "
                        "http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--submission-id", help="the job's id (default: one Ray picks)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable of the job and its workers (repeatable)")
    submit.add_argument("--code-dir", default=".", metavar="DIR",
                        help="the directory whose top-level Python modules and packages go with the "
                             "job, for --model my_module:MyNet (default: the current directory)")
    submit.add_argument("--pip", action="store_true",
                        help="install raydeep's Python requirements in the job's environment")
    submit.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="the raydeep command to run, e.g. -- raydeep run --strategy ps")

    jobs = commands.add_parser("jobs", help="list the cluster's jobs, show or stop one")
    jobs.add_argument("action", choices=["list", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--address", help="as for raydeep submit")
    jobs.add_argument("--follow", action="store_true", help="logs: follow until the job ends")

    ui = commands.add_parser("ui", help="serve the MLflow UI over the run store")
    ui.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--allow-remote", action="store_true",
                    help="listen on a --host other machines reach (MLflow's server has no authentication)")

    commands.add_parser("models", help="list model families and their hyper-parameters")
    commands.add_parser("strategies", help="list training strategies")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    launched_at = _launch_time()
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(str(e))
    if getattr(args, "verbose", False):
        from cluster.connect import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    if args.command == "models":
        return cmd_models()
    if args.command == "strategies":
        return cmd_strategies()
    if args.command == "ui":
        from cluster.ui import serve

        return serve(args.tracking_uri, args.host, args.port, args.allow_remote)
    if args.command == "tune":
        return cmd_tune(args)
    if args.command in ("submit", "jobs"):
        return cmd_cluster_jobs(args)
    return cmd_run(args, launched_at)


def cmd_cluster_jobs(args: argparse.Namespace) -> int:
    from cluster.jobs import JobsError, cmd_jobs
    from cluster.submit import cmd_submit

    try:
        return cmd_submit(args) if args.command == "submit" else cmd_jobs(args)
    except JobsError as e:
        return _fail(str(e))


def cmd_run(args: argparse.Namespace, launched_at: float) -> int:
    from cluster.connect import quiet_ray_logs

    quiet_ray_logs()
    from pipelines import ConfigError, RunFailed, config, recipes, startup, train
    from pipelines.errors import InterruptedUnmarked, TrackingUnreachable
    from pipelines.run import prepare

    startup.launched(launched_at)
    startup.mark("imported")

    try:
        overrides = {key: config.Text(getattr(args, key)) for key in RUN_FLAGS.values()
                     if getattr(args, key) is not None}
        if args.resume:
            from pipelines import resume

            overrides["resume"] = config.Text(args.resume)
            run_config, notes = resume.load(args.config, overrides, args.sets)
            for note in notes:
                print(note)
        else:
            run_config = config.load(args.config, {**overrides, "recipe": False} if args.no_recipe else overrides,
                                     args.sets)
        if args.print_schedule:
            return cmd_print_schedule(run_config)
        took = recipes.describe(run_config)  # the defaults it took, if a recipe gave any
        if took:
            print(took)
        from pipelines import registry

        failed = registry.get(run_config.strategy.name).needs_ray(run_config) and _check_address(args, run_config)
        if failed:
            return _fail(failed)
        data, _ = prepare(run_config)
    except ConfigError as e:
        return _fail(str(e))
    startup.mark("prepared")
    if registry.get(run_config.strategy.name).needs_ray(run_config):
        from pipelines.tracking import open_store_in_background

        store = open_store_in_background(run_config.tracking.uri)
        failed = _connect(run_config)
        if failed:
            return _fail(failed)
        startup.mark("ray_ready")
        store.join()
    try:
        with _terminate_as_interrupt():
            result = train(run_config, data)
    except ConfigError as e:
        return _fail(str(e))
    except RunFailed as e:
        print(f"raydeep: run failed (MLflow run {e.run_id} marked FAILED): {e}", file=sys.stderr)
        return 1
    except TrackingUnreachable as e:  # the MLflow run cannot be marked; the message says what to do
        print(f"raydeep: error: {e}", file=sys.stderr)
        return 1
    except InterruptedUnmarked as e:
        print(f"raydeep: interrupted; {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("raydeep: interrupted; the MLflow run is marked KILLED", file=sys.stderr)
        return 130
    print(f"MLflow run {result.run_id} ({result.run_name}) finished")
    width = max(map(len, result.metrics), default=0)
    for key, value in result.metrics.items():  # integers with thousands separators
        print(f"  {key:<{width}} {f'{value:,.0f}' if float(value).is_integer() else f'{value:.4f}'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cluster.connect import quiet_ray_logs

    quiet_ray_logs()
    from pipelines import ConfigError, config
    from pipelines.sweep.config import load

    try:
        overrides = {key: config.Text(getattr(args, key)) for key in RUN_FLAGS.values()
                     if getattr(args, key) is not None}
        sweep = load(args.config, overrides, args.sets, samples=args.samples, scheduler=args.scheduler,
                     search=args.search, max_concurrent=args.max_concurrent)
        from pipelines.sweep.runner import check_resumable

        check_resumable(sweep, args.resume)
    except ConfigError as e:
        return _fail(str(e))
    failed = _check_address(args, sweep.run_config({}))
    if failed:
        return _fail(failed)
    failed = _connect(sweep.run_config({}), sweep=True)
    if failed:
        return _fail(failed)
    from pipelines.errors import TrackingUnreachable
    from pipelines.sweep.runner import run_sweep

    try:
        with _terminate_as_interrupt():
            result = run_sweep(sweep, args.resume)
    except ConfigError as e:
        return _fail(str(e))
    except TrackingUnreachable as e:  # Tune's own state is kept: --resume carries the sweep on
        print(f"raydeep: error: {e}; the sweep's trials are kept: raydeep tune {args.config} --resume",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"raydeep: interrupted; finish the sweep with: raydeep tune {args.config} --resume",
              file=sys.stderr)
        return 130
    print_sweep(result)
    if result.interrupted:
        print(f"raydeep: sweep interrupted; finish it with: raydeep tune {args.config} --resume "
              f"{result.name}", file=sys.stderr)
        return 130
    return 0


def print_sweep(result) -> None:
    """The trials, best first, then failures and the best config's path."""
    counts = ", ".join(f"{result.count(s)} {s.lower()}" for s in ("FINISHED", "KILLED", "FAILED"))
    print(f"\nsweep {result.name}: {len(result.trials)} trials ({counts}); "
          f"MLflow parent run {result.parent_run_id}")
    sign = 1 if result.mode == "max" else -1
    ranked = sorted(result.trials, key=lambda t: (t.metric is None, -sign * (t.metric or 0.0)))
    print(f"  {'trial':<28} {'status':<9} {result.metric:>14} {'epochs':>6}  params")
    for t in ranked:
        shown = f"{t.metric:.4f}" if t.metric is not None else "-"
        params = " ".join(f"{k}={v}" for k, v in t.params.items())
        print(f"  {t.name:<28} {t.status:<9} {shown:>14} {t.epochs:>6}  {params}")
    for t in ranked:
        if t.status == "FAILED":
            print(f"  failed: {t.name}: {t.error or 'no reason recorded'}")
    for c in result.configurations[:5]:
        values = " ".join(f"{k}={v}" for k, v in c.values.items())
        print(f"  configuration {c.mean:.4f} over {len(c.trials)}/{c.seed_count} seeds  {values}")
    if result.best_config is not None:
        print(f"best: {result.best.name} ({result.best_said}); "
              f"its config: {result.best_config}\n  raydeep run {result.best_config}")


def _check_address(args: argparse.Namespace, run_config) -> str | None:
    """Why the run's Ray address cannot be joined, said before the data, the tracking store
    or Ray start."""
    from cluster.ray_address import refusal

    return refusal(getattr(args, "resources.address", None), run_config.resources.address)


def _connect(run_config, sweep: bool = False) -> str | None:
    """Connect to the run's Ray; the one-line reason when that fails, or when the cluster
    has several nodes and the run's storage is on one of them. A sweep's embedded Ray keeps
    its dashboard, whose state API Ray Train needs, whatever strategies its trials take."""
    from cluster.connect import connect
    from cluster.ray_address import note_live_cluster
    from cluster.storage import shared_storage_problem
    from pipelines import imported_model, registry
    from pipelines.errors import first_line
    from pipelines.streaming import data_shortfall, embedded_cpus
    from pipelines.training.placement import shortfall

    note_live_cluster(run_config.resources.address)
    try:
        strategy = registry.get(run_config.strategy.name)
        resources = connect(run_config.resources.address, embedded_cpus(run_config),
                            dashboard=sweep or strategy.needs_dashboard,
                            runtime_env=imported_model.runtime_env(run_config),
                            streaming=bool(run_config.data.stream) and not sweep)
    except (OSError, ValueError, RuntimeError) as e:  # OSError: also a Ray temp dir it cannot use
        where = run_config.resources.address or "an embedded local Ray"
        return f"cannot connect to {where}: {first_line(e)}"
    bundles = strategy.actor_bundles(run_config)
    return shortfall(bundles, resources) or data_shortfall(run_config, bundles, resources) or shared_storage_problem(run_config)


def _switch(flag: str) -> dict:
    """`--pack` alone means `--pack true` (and `--stream`, `--stream true`)."""
    return {"nargs": "?", "const": "true"} if flag in ("--pack", "--stream") else {}


def cmd_print_schedule(run_config) -> int:
    from pipelines import registry

    print(registry.get(run_config.strategy.name).describe(run_config))
    return 0


def cmd_models() -> int:
    import models

    for name in models.names():
        spec = models.get(name)
        params = ", ".join(f"{k}={v}" for k, v in spec.hyper_parameters().items())
        print(f"{name:<12} {spec.description}\n{'':<12} {params}")
    print("or your own nn.Module: --model my_module:MyNet [--set model.init_args.KEY=VALUE] "
          "(models/contract.py says what it offers)")
    return 0


def cmd_strategies() -> int:
    from pipelines import registry

    for name in registry.names():
        print(f"{name:<12} {registry.get(name).description}")
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (`raydeep jobs stop`, a pod evicted, `kill`) ends a run as Ctrl-C does: the
    MLflow run is marked KILLED and its checkpoints stay for `--resume`."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    from pipelines import interrupts

    previous = {sig: signal.signal(sig, interrupts.handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(message: str) -> int:
    print(f"raydeep: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

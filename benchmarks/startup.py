"""Time from `raydeep run` to each strategy's first optimizer step, with its start-up timeline.

Runs the installed `raydeep run` as a user would: a fresh process each time, in its own
temporary directory with its own SQLite MLflow store, so every run pays for Python's
imports, an embedded Ray's start, MLflow's first import and the strategy's actors. The
strategies take turns (the order rotates each repeat), so a slow spell of the machine does
not land on one strategy only. Each run's `time_to_first_step_s` and `startup_<mark>_s`
metrics (seconds since the CLI started) are read back from its store.

    .venv/bin/python benchmarks/startup.py                         # 5 strategies x 3 repeats
    .venv/bin/python benchmarks/startup.py --repeats 5 --json startup.json
    .venv/bin/python benchmarks/startup.py --strategies allreduce local --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {
    "allreduce": ["--strategy", "allreduce", "--workers", "2"],
    "ps": ["--strategy", "ps", "--workers", "2", "--shards", "2"],
    "pipeline": ["--strategy", "pipeline", "--stages", "2", "--microbatches", "4"],
    "lbfgs": ["--strategy", "lbfgs", "--workers", "2", "--shards", "2"],
    "local": ["--strategy", "local"],
}
COMMON = ["--model", "mlp", "--epochs", "1", "--set", "tracking.log_model=false"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each strategy (default 3)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every run (repeatable)")
    parser.add_argument("--raydeep", default=str(Path(sys.executable).with_name("raydeep")),
                        help="the console script to run (default: the one beside this Python)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()

    began = time.perf_counter()
    runs = []
    for repeat in range(args.repeats):
        turn = repeat % len(args.strategies)
        for name in args.strategies[turn:] + args.strategies[:turn]:
            run = run_once(args, name)
            runs.append({"strategy": name, "repeat": repeat, **run})
            shown = (f"first step {run['time_to_first_step_s']:.1f} s" if run["ok"]
                     else f"FAILED (exit {run['rc']})")
            print(f"[{repeat + 1}/{args.repeats}] {name:<9} {shown}, whole command "
                  f"{run['wall_s']:.1f} s", flush=True)
    summary = {name: summarize([r for r in runs if r["strategy"] == name and r["ok"]])
               for name in args.strategies}
    print()
    print(report(summary))
    failed = [r for r in runs if not r["ok"]]
    for r in failed:
        print(f"\n{r['strategy']} (repeat {r['repeat'] + 1}) failed:\n{r['output_tail']}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "repeats": args.repeats, "commands": {n: STRATEGIES[n] + COMMON for n in args.strategies},
            "benchmark_wall_s": time.perf_counter() - began, "runs": runs, "summary": summary},
            indent=1))
        print(f"\nfigures written to {args.json}")
    return 1 if failed else 0


def run_once(args: argparse.Namespace, strategy: str) -> dict:
    """One `raydeep run` in a directory of its own; its exit, wall time and timeline."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # an embedded Ray, started by the run: its start is measured
    with tempfile.TemporaryDirectory(prefix=f"startup-{strategy}-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        command = [args.raydeep, "run", *STRATEGIES[strategy], *COMMON, "--tracking-uri", uri,
                   *(item for pair in args.sets for item in ("--set", pair))]
        began = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = -1, f"timed out after {args.timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
        wall = time.perf_counter() - began
        metrics = read_metrics(uri) if rc == 0 else {}
    first = metrics.get("time_to_first_step_s")
    marks = {key[len("startup_"):-len("_s")]: value for key, value in metrics.items()
             if key.startswith("startup_") and key.endswith("_s")}
    return {"ok": rc == 0 and first is not None, "rc": rc, "wall_s": wall,
            "time_to_first_step_s": first, "marks": marks,
            "output_tail": "" if rc == 0 else "\n".join(output.splitlines()[-15:])}


def read_metrics(uri: str) -> dict[str, float]:
    """The final value of each metric of the store's one run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, max_results=1)
    return dict(found[0].data.metrics) if found else {}


def summarize(runs: list[dict]) -> dict:
    """Medians over a strategy's runs; the timeline's marks ordered by their median."""
    if not runs:
        return {"runs": 0}
    firsts = [r["time_to_first_step_s"] for r in runs]
    names = {name for r in runs for name in r["marks"]}
    marks = {name: statistics.median(r["marks"][name] for r in runs if name in r["marks"])
             for name in names}
    return {"runs": len(runs), "time_to_first_step_s": {
                "median": statistics.median(firsts), "min": min(firsts), "max": max(firsts)},
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "timeline_s": dict(sorted(marks.items(), key=lambda item: item[1]))}


def report(summary: dict) -> str:
    lines = ["time to first step, seconds since `raydeep run` started (median [min - max]), "
             "and the whole command's wall time (median)"]
    for name, s in summary.items():
        if not s["runs"]:
            lines.append(f"  {name:<10} no successful run")
            continue
        first = s["time_to_first_step_s"]
        lines.append(f"  {name:<10} {first['median']:6.1f} s  [{first['min']:.1f} - {first['max']:.1f}]"
                     f"   whole command {s['wall_s']:.1f} s   ({s['runs']} runs)")
    lines.append("")
    lines.append("start-up timeline, median seconds since launch")
    for name, s in summary.items():
        if s["runs"]:
            lines.append(f"  {name}")
            lines.extend(f"    {mark:<18} {seconds:6.2f}" for mark, seconds in s["timeline_s"].items())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

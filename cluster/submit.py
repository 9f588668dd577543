"""`raydeep submit -- raydeep run ...`: send a raydeep command to a cluster as a Ray job.

The repository goes up as the job's `working_dir` (`.rayignore` keeps data, MLflow stores,
checkpoints and virtual environments out), so the cluster runs the code on this laptop, not
whatever version its image holds. Submitted from a user's own project (`--code-dir`, default
the current directory, holding their model's modules), that directory is the job's
`working_dir` instead, and raydeep's packages go beside it as `py_modules`. The job's driver runs the command on the head node; the
environment variables given here reach it and every worker it starts, which is how the MLflow
tracking URI gets to all of them. No secret goes with a job (`cluster/job_env.py`): the job's
record is readable through the Jobs API, so the cluster's own credentials serve.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from cluster import jobs as jobs_api
from cluster.job_env import check_command, job_env, kept_here
from cluster.jobs import JobsError
from pipelines.user_code import RAYDEEP_PACKAGES, shipped

REPO = Path(__file__).resolve().parents[1]

WORKER_PIP = ["mlflow>=3.0", "pyarrow>=14", "pyyaml>=6", "scikit-learn>=1.3", "matplotlib>=3.7",
              "optuna>=3.0"]
"""`--pip`: what raydeep needs beyond an image that has torch and Ray (a `rayproject/ray`
image, say). Off by default: installing per job is slow and a cluster built from
cluster/configs/ has them already."""


def runtime_env(env_pairs: list[str], pip: bool, code_dir: str | None = None) -> dict:
    """The job's runtime_env: this repository, the user's code (the top-level modules and
    packages of `code_dir`, as `py_modules`), the forwarded settings, optionally pip."""
    try:
        env = job_env(env_pairs)
    except ValueError as e:
        raise JobsError(str(e)) from None
    env.setdefault("PYTHONUNBUFFERED", "1")  # progress lines reach the log as they are printed
    spec: dict = {"working_dir": str(REPO), "env_vars": env}
    if _has_user_code(code_dir):
        # The user's directory is the job's working_dir, as `ray job submit --working-dir`
        # makes it: their modules import as they do at home, their relative paths hold.
        # raydeep's own packages go beside it (py_modules), this checkout's version.
        spec["working_dir"] = str(Path(code_dir).resolve())
        spec["py_modules"] = [str(REPO / package) for package in RAYDEEP_PACKAGES]
    if pip:
        spec["pip"] = list(WORKER_PIP)
    return spec


def _has_user_code(code_dir: str | None) -> bool:
    """Whether `code_dir` holds Python modules or packages of a user's (not this checkout)."""
    if code_dir is None:
        return False
    root = Path(code_dir).resolve()
    if not root.is_dir():
        raise JobsError(f"--code-dir {code_dir!r} is not a directory")
    return root != REPO and bool(shipped(root, ""))


def entrypoint(command: list[str]) -> str:
    """The shell command the job runs; only raydeep commands are accepted."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise JobsError("nothing to submit: raydeep submit [OPTIONS] -- raydeep run ...")
    if command[0] not in ("raydeep", "python", "python3"):
        raise JobsError(f"the job must be a raydeep command (raydeep run|tune ...), got {command[0]!r}")
    try:
        check_command(command)
    except ValueError as e:
        raise JobsError(str(e)) from None
    return shlex.join(command)


def cmd_submit(args) -> int:
    """Submit, then (unless --no-wait) follow the logs and exit with the job's result."""
    from cluster.connect import quiet_ray_logs

    quiet_ray_logs()  # Ray's INFO lines on packaging the working_dir stay off the terminal
    command = entrypoint(args.job_command)
    spec = runtime_env(args.env, args.pip, args.code_dir)
    jobs = jobs_api.client(args.address)
    url = jobs.get_address()
    job_id = jobs_api.guarded(lambda: jobs.submit_job(
        entrypoint=command, runtime_env=spec, submission_id=args.submission_id,
        metadata={"raydeep": "submit"}), url)
    kept = kept_here()
    code = "" if spec["working_dir"] == str(REPO) else f" with the code of {spec['working_dir']}"
    print(f"raydeep: submitted job {job_id} to {url}{code}" + (
        f" ({', '.join(kept)} set here not sent: the cluster's own credentials serve)" if kept else ""),
        file=sys.stderr, flush=True)
    if args.no_wait:
        print(job_id)
        print(f"raydeep: follow it with: raydeep jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    try:
        status = jobs_api.follow(jobs, job_id)
    except KeyboardInterrupt:
        print(f"\nraydeep: stopped following; the job goes on (raydeep jobs stop {job_id})",
              file=sys.stderr)
        return 130
    print(f"raydeep: job {job_id} {status}", file=sys.stderr)
    return jobs_api.TERMINAL_EXIT.get(status, 1)

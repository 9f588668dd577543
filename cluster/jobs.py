"""Talking to a cluster's Ray Jobs server: the client, its token, and `raydeep jobs`.

Every failure a user can cause from a laptop (nobody listens at the address, a missing or
wrong token, an unknown job id) becomes `JobsError` with one line saying what to do.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from pipelines.errors import first_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
"""`raydeep submit`'s exit code for each final job status."""

TOKEN_HELP = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's "
              "token; on the head node `ray get-auth-token` prints it")


class JobsError(Exception):
    """A one-line reason the Jobs server could not do what was asked."""


def address(given: str | None) -> str:
    """--address, else RAY_ADDRESS when it is a dashboard URL, else the local default."""
    if given:
        return given if "://" in given else f"http://{given}"
    value = os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in value:  # `RAY_ADDRESS=host:6379` names the GCS, not the Jobs server
        host = value.rpartition(":")[0] or value
        return f"http://{host}:8265" if value not in ("auto", "local") else DEFAULT_ADDRESS
    return value


def auth_token() -> str | None:
    """The token Ray's own clients would send, read where they read it.

    Ray's Jobs client sends one only when RAY_AUTH_MODE=token in *this* process, but a
    cluster started by `ray start` turns token auth on by itself; sending the token we have
    costs nothing against a cluster without auth and makes the common case just work.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        try:
            token = Path(path).read_text().strip() if path else ""
        except OSError:
            continue
        if token:
            return token
    return None


def client(given_address: str | None):
    """A connected `JobSubmissionClient`, or `JobsError` in one line."""
    from ray.job_submission import JobSubmissionClient

    url = address(given_address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return guarded(lambda: JobSubmissionClient(url, headers=headers), url)


def guarded(call, url: str):
    """Run `call`, turning the Jobs client's errors into one line."""
    from ray.exceptions import AuthenticationError

    try:
        return call()
    except AuthenticationError:
        # Whether we had a token decides the message: Ray words the same failure differently
        # depending on RAY_AUTH_MODE in this process (which `ray.init` sets).
        if auth_token() is None:
            raise JobsError(f"the Ray cluster at {url} needs a token and none was found: "
                            f"{TOKEN_HELP}") from None
        raise JobsError(f"the Ray cluster at {url} refused the token: {TOKEN_HELP}") from None
    except ConnectionError:
        raise JobsError(f"no Ray Jobs server answers at {url} (start one with `ray start --head`, "
                        "or pass --address http://HEAD:8265)") from None
    except (RuntimeError, ValueError) as e:
        raise JobsError(f"{url}: {first_line(e)}") from None


def wait(jobs, job_id: str, poll_s: float = 1.0) -> str:
    """Block until the job ends; its final status name."""
    while True:
        status = guarded(lambda: jobs.get_job_status(job_id), jobs.get_address())
        if status.is_terminal():
            return status.value
        time.sleep(poll_s)


def follow(jobs, job_id: str, out=sys.stdout) -> str:
    """Print the job's logs as they come, then return its final status name."""
    printed = 0

    async def tail():
        nonlocal printed
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", file=out, flush=True)
            printed += len(lines)

    try:
        asyncio.run(tail())
    except Exception:
        # The stream runs through one node's agent; losing that node drops it, not the job.
        # The job's status says how it ends, and its full log gives the part we missed.
        status = wait(jobs, job_id)
        logs = guarded(lambda: jobs.get_job_logs(job_id), jobs.get_address())
        print(logs[printed:], end="", file=out, flush=True)
        return status
    return wait(jobs, job_id)


def cmd_jobs(args) -> int:
    """`raydeep jobs list|logs JOB_ID|stop JOB_ID`."""
    jobs = client(args.address)
    url = jobs.get_address()
    if args.action == "list":
        listed = guarded(jobs.list_jobs, url)
        print(f"{'submission id':<28} {'status':<10} {'started':<19}  entrypoint")
        for job in sorted(listed, key=lambda j: j.start_time or 0):
            started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
                       if job.start_time else "-")
            print(f"{job.submission_id or job.job_id or '-':<28} {job.status.value:<10} "
                  f"{started:<19}  {job.entrypoint}")
        return 0
    if not args.job_id:
        raise JobsError(f"raydeep jobs {args.action} needs a JOB_ID (see `raydeep jobs list`)")
    if args.action == "logs":
        if args.follow:
            return TERMINAL_EXIT.get(follow(jobs, args.job_id), 1)
        print(guarded(lambda: jobs.get_job_logs(args.job_id), url), end="")
        return 0
    stopped = guarded(lambda: jobs.stop_job(args.job_id), url)
    print(f"job {args.job_id}: " + ("stop requested" if stopped else "already finished"))
    return 0

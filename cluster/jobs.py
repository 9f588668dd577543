"""Talking to a cluster's Ray Jobs server: the client, its token, and `raydeep jobs`.

Every failure a user can cause from a laptop (nobody listens at the address, a missing or
wrong token, an unknown job id) becomes `JobsError` with one line saying what to do.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

from cluster.addresses import AddressError, check_jobs_server, is_loopback
from pipelines.errors import first_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
"""`raydeep submit`'s exit code for each final job status."""

TOKEN_HELP = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's "
              "token; on the head node `ray get-auth-token` prints it")


class JobsError(Exception):
    """A one-line reason the Jobs server could not do what was asked."""


API_SERVER_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""Where Ray's Jobs client looks for its server, in this order, over the address it is given."""


def address(given: str | None) -> tuple[str, str]:
    """The Jobs server's URL and what named it: --address, else RAY_API_SERVER_ADDRESS or
    RAY_ADDRESS, else the local default."""
    if given is None:
        env = _from_env()
        return env[:2] if env else (DEFAULT_ADDRESS, "")
    given = given.strip()
    if not given:
        raise JobsError("--address is empty: give the Jobs server's http://HEAD:8265, or leave it out "
                        f"for RAY_ADDRESS, then {DEFAULT_ADDRESS}")
    if given.startswith("ray://"):
        raise JobsError(f"--address {given} is a Ray client address: raydeep submit and jobs talk to "
                        "the cluster's Jobs server, http://HEAD:8265")
    return (given if "://" in given else f"http://{given}"), "--address"


def _from_env() -> tuple[str, str, str] | None:
    """(URL, what names it, the variable) from Ray's variables, if one is set."""
    for name in API_SERVER_ENV:
        value = os.environ.get(name, "").strip()
        if not value or value in ("auto", "local"):
            continue
        if "://" not in value or value.startswith("ray://"):
            # `RAY_ADDRESS=host:6379` names the GCS, ray://host:10001 the client server: the
            # head's Jobs server is on its port 8265
            head = value.removeprefix("ray://")
            return f"http://{head.rpartition(':')[0] or head}:8265", f"{name}={value}'s Jobs server", name
        return value, name, name
    return None


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
    """A connected `JobSubmissionClient`, or `JobsError` in one line.

    The address is checked first, with no token sent (`cluster.addresses`): nobody there,
    a port that says nothing, or a web server that is not Ray is refused within seconds.
    """
    from ray.job_submission import JobSubmissionClient

    url, origin = address(given_address)
    env = _from_env()
    ignored = f"{env[2]}={os.environ[env[2]].strip()}" if origin == "--address" and env and env[0] != url else ""
    try:
        host = check_jobs_server(url, origin)
    except AddressError as e:
        raise JobsError(f"{e} ({ignored} is not used: --address wins)" if ignored else str(e)) from None
    if ignored:
        print(f"raydeep: using --address {url}; {ignored} is not used", file=sys.stderr)
    token = auth_token()
    if token and url.startswith("http://") and not is_loopback(host):
        print(f"raydeep: warning: the Ray token goes to {url} unencrypted (plain http); use https:// "
              "or a tunnel to 127.0.0.1 (`ray dashboard CLUSTER.yaml`)", file=sys.stderr)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _hidden(API_SERVER_ENV):  # Ray's client would take them over `url`
        return guarded(lambda: JobSubmissionClient(url, headers=headers), url)


@contextlib.contextmanager
def _hidden(names):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def guarded(call, url: str, job_id: str | None = None):
    """Run `call`, turning the Jobs client's errors into one line (a 404 about `job_id`:
    no such job)."""
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
        if job_id is not None and "status code 404" in str(e):
            raise JobsError(f"no job {job_id!r} at {url} (`raydeep jobs list` shows its jobs)") from None
        raise JobsError(f"{url}: {first_line(e)}") from None
    except OSError as e:  # requests' errors: the server went away in the middle of a call
        raise JobsError(f"lost the connection to the Jobs server at {url} ({first_line(e)})") from None


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
    if args.action != "list" and not args.job_id:
        raise JobsError(f"raydeep jobs {args.action} needs a JOB_ID (see `raydeep jobs list`)")
    if args.action == "list" and args.job_id:
        raise JobsError(f"raydeep jobs list takes no JOB_ID (raydeep jobs logs {args.job_id} shows one)")
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
    guarded(lambda: jobs.get_job_info(args.job_id), url, args.job_id)  # one line for an unknown id
    if args.action == "logs":
        if args.follow:
            return TERMINAL_EXIT.get(follow(jobs, args.job_id), 1)
        print(guarded(lambda: jobs.get_job_logs(args.job_id), url), end="")
        return 0
    stopped = guarded(lambda: jobs.stop_job(args.job_id), url)
    print(f"job {args.job_id}: " + ("stop requested" if stopped else "already finished"))
    return 0

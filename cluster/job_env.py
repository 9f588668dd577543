"""What a submitted job's environment may hold: settings, never secrets.

A job's `runtime_env` and its command line are part of the job's record on the cluster:
anyone who reaches the Jobs API (the dashboard's port) reads them with `ray job list` or a
plain HTTP GET, for as long as the cluster keeps the job. So `raydeep submit` sends the
settings that say where things are (the tracking server, the experiment, the region and
endpoint of an object store) and no credential: the cluster holds its own (an instance
role or service account, or the variables set where `ray start` runs on each node, which
every job and worker there inherits). A secret given explicitly (`--env
AWS_SECRET_ACCESS_KEY=...`, a URI with a password in the command or the environment) is
refused in one line that says so; credentials set on this machine stay here, and the
submitted line names them.
"""
from __future__ import annotations

import os
import re

from pipelines.errors import redact

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
"""Set here, they are set in the job too: where runs are tracked and where storage is."""

KEPT_HERE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN")
"""Credentials a laptop commonly holds; never sent (the submitted line names those set)."""

SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|PASS|CREDENTIALS?|PRIVATE|KEY)(_|$)", re.I)
"""A variable whose name says it holds a secret (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...)."""

HOW = ("anyone who reaches the cluster's Jobs API reads a job's environment and command: give the "
       "cluster its own credentials (an instance role, or the variable set where `ray start` runs)")


class SecretRefused(ValueError):
    """One line: a secret would have gone into the job's record."""


def job_env(env_pairs: list[str]) -> dict[str, str]:
    """The job's environment variables: the forwarded settings, then `--env` pairs."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for key, value in env.items():
        _refuse_password(f"{key} (set here)", value)
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env takes KEY=VALUE, got {redact(pair)!r}")
        if SECRET_NAME.search(key):
            raise SecretRefused(f"--env {key}=... is a secret, and {HOW}")
        _refuse_password(f"--env {key}", value)
        env[key] = value
    return env


def check_command(command: list[str]) -> None:
    """No password in the job's command line (a tracking URI with one, say)."""
    for arg in command:
        _refuse_password("the job's command", arg)


def kept_here() -> list[str]:
    """The credentials set on this machine that the job does not get."""
    return [k for k in KEPT_HERE_ENV if os.environ.get(k)]


def _refuse_password(where: str, value: str) -> None:
    if redact(value) != value:
        raise SecretRefused(f"{where} holds a password ({redact(value)!r}), and {HOW}")

"""Which Ray `raydeep run` and `raydeep tune` join, checked before anything starts.

`--address` (the config's `resources.address`) wins over RAY_ADDRESS, and saying so is one
line: RAY_ADDRESS is what a shell left set, `--address` is what this command says. Without
either, a run starts a Ray of its own (`address="local"`), and says so in one line when a
live cluster started with `ray start` was there to be joined. An address is refused in one
line, within seconds, when it is malformed, its host does not resolve, nobody answers
there, or what answers is not Ray (`cluster.addresses`).
"""
from __future__ import annotations

import os
import sys

from cluster.addresses import AddressError, check_grpc

USAGE = "HOST:PORT of the head's GCS (port 6379), ray://HOST:10001 or auto"
OWN_RAY = "local"
"""`ray.init`'s address for a new Ray of this process's own (not a strategy's name)."""
LIVE_PROBE_S = 2.0
"""How long a recorded `ray start` cluster gets to answer before it counts as gone. A dead
cluster's port refuses at once, so this is only waited for by a live one that is slow: a
head on a loaded 2-core machine took longer than 0.5 s once."""


def chosen(given: str | None, named: str = "--address") -> tuple[str | None, str]:
    """The address to join and what named it (`named`: the flag, or the config key it was
    set by); (None, "") for a Ray of raydeep's own."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    address, origin = (given, named) if given is not None else (env or None, "RAY_ADDRESS")
    if address is not None and address.strip() == OWN_RAY:
        return None, ""
    return (address.strip(), origin) if address is not None else (None, "")


def check(given: str | None, named: str = "--address") -> str | None:
    """The address a run joins (None: a Ray of its own), checked; `AddressError` in one line.

    Prints (stderr) the line that says RAY_ADDRESS is not used when `--address` differs from
    it (`note_live_cluster` says when a live `ray start` cluster is not joined). Ray's own clients read RAY_ADDRESS
    over an explicit address (its state API, its Jobs client): once `--address` has won,
    this process forgets it.
    """
    address, origin = chosen(given, named)
    env = os.environ.get("RAY_ADDRESS", "").strip()
    overridden = origin == named and bool(env) and env != address
    try:
        if address is not None:
            check_one(address, origin)
    except AddressError as e:
        raise AddressError(f"{e} (RAY_ADDRESS={env} is not used: {named} wins)" if overridden
                           else str(e)) from None
    if overridden:
        print(f"raydeep: joining {named} {address}; RAY_ADDRESS={env} is not used", file=sys.stderr)
        os.environ.pop("RAY_ADDRESS", None)
    return address


def note_live_cluster(address: str | None) -> None:
    """Say (stderr) that a live `ray start` cluster is not joined, when a run with no address
    is about to start a Ray of its own; said only then, so a refused run stays one line."""
    if address is None and not os.environ.get("RAY_ADDRESS", "").strip() and not _ray_started():
        live = live_recorded_cluster()
        if live:
            print(f"raydeep: a Ray cluster runs at {live}; this run starts a Ray of its own "
                  f"(--address {live} joins it)", file=sys.stderr)


def refusal(flag: str | None, configured: str | None) -> str | None:
    """`check` for the CLI: the one-line reason, or None. `flag` is --address as typed:
    `--address ''` is refused, not read as "no address" as the config reads it. An address
    from `--set` or a YAML file is named by its key, `resources.address`."""
    try:
        check("" if flag is not None and not flag.strip() else configured,
              "--address" if flag is not None else "resources.address")
    except AddressError as e:
        return str(e)
    return None


def check_one(address: str, origin: str) -> None:
    """`address` (named by `origin`: --address or RAY_ADDRESS) can be a Ray cluster."""
    subject = f"{origin} {address}" if address else origin
    if not address:
        raise AddressError(f"{origin} is empty: give {USAGE}, or leave it out for a Ray of raydeep's own")
    if address == "auto":
        recorded = _recorded()
        if recorded:  # what Ray would join: the last `ray start` on this machine
            check_grpc(recorded, f"{subject} (the cluster of the last `ray start` here, {recorded})")
        return  # with no record, Ray says at once that it finds no cluster
    scheme, sep, rest = address.partition("://")
    if not sep:
        check_grpc(address, subject)
    elif scheme == "ray":
        check_grpc(rest.rstrip("/"), subject)
    elif scheme in ("http", "https"):
        raise AddressError(f"{subject} is a web address: raydeep run and tune join Ray at {USAGE}; "
                           "a Jobs server (http://HEAD:8265) takes jobs from raydeep submit --address")
    else:
        raise AddressError(f"{subject}: {scheme}:// is not a Ray address (give {USAGE})")


def live_recorded_cluster() -> str | None:
    """The address in Ray's `ray_current_cluster` file when a cluster answers there."""
    recorded = _recorded()
    if not recorded:
        return None
    try:
        check_grpc(recorded, recorded, reply_timeout=LIVE_PROBE_S)
    except AddressError:
        return None  # a dead cluster's leftover file: nothing to join
    return recorded


def _recorded() -> str | None:
    """What `ray start` last recorded in Ray's temp folder (Ray's own reader; private)."""
    try:
        from ray._private.utils import read_ray_address

        return (read_ray_address() or "").strip() or None
    except (ImportError, OSError):
        return None


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray and getattr(ray, "is_initialized", lambda: False)())

"""Checking an address before anything is sent to it: its form, its host, and whether what
answers there is Ray at all.

`ray.init` retries an address for half a minute or more and prints Ray's C++ warnings
while it does, whether nobody listens there or a web server does; the Jobs client waits
without a timeout on a port that accepts and says nothing. These checks take a second at
most and name the problem in one line (`AddressError`).

Ray's GCS and its client server (`ray://`) speak gRPC, which is HTTP/2: sent HTTP/2's
connection preface, a gRPC server answers with a SETTINGS frame before anything else.
That is the handshake Ray's own client waits for (`grpc.channel_ready_future`), checked
once instead of retried. A Jobs server is Ray's dashboard: `GET /api/version` names the
Ray version (or, with token auth on, answers 401 to a request without the token).
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

CONNECT_TIMEOUT_S = 3.0
REPLY_TIMEOUT_S = 2.0
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""HTTP/2's client preface, then an empty SETTINGS frame (length 0, type 4, stream 0)."""


class AddressError(ValueError):
    """A one-line reason an address cannot be a Ray cluster (or a Jobs server)."""


def host_port(address: str, subject: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets, `[::1]:6379`) split, or `AddressError`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port:
        raise AddressError(f"{subject} has no port (HOST:PORT, e.g. 10.0.0.5:6379)")
    if not host:
        raise AddressError(f"{subject} has no host (HOST:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port_number(port, subject)


def port_number(port: str | int | None, subject: str) -> int:
    if not str(port).isdigit():
        raise AddressError(f"{subject}: the port {port!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise AddressError(f"{subject}: the port must be in 1..65535, got {port}")
    return int(port)


def resolve(host: str, port: int, subject: str) -> list[str]:
    """The host's IP addresses, or `AddressError` when it does not resolve."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise AddressError(f"{subject}: the host {host!r} does not resolve "
                           f"({getattr(e, 'strerror', None) or e})") from None
    return [info[4][0] for info in found]


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (a tunnel's end)."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


def check_grpc(address: str, subject: str, reply_timeout: float = REPLY_TIMEOUT_S) -> None:
    """`HOST:PORT` is a gRPC server (a Ray GCS or Ray client server), or `AddressError`."""
    host, port = host_port(address, subject)
    resolve(host, port, subject)
    connect_timeout = min(CONNECT_TIMEOUT_S, reply_timeout + 1)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except socket.timeout:
        raise AddressError(f"{subject}: nothing answers there within {connect_timeout:g} s") from None
    except OSError as e:
        raise AddressError(f"{subject}: no Ray cluster answers there "
                           f"({(e.strerror or str(e)).lower()})") from None
    # With TLS on (RAY_USE_TLS) the GCS expects a TLS handshake first: reaching it is all
    # that is checked then.
    if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
        sock.close()
        return
    with sock:
        reply = b""
        try:
            sock.settimeout(reply_timeout)
            sock.sendall(_H2_PREFACE)
            while len(reply) < 9:
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
        except socket.timeout:
            pass
        except OSError:
            pass  # reset by the peer: said nothing gRPC
    if len(reply) == 9 and reply[3] == 4:  # a SETTINGS frame: HTTP/2, as gRPC speaks it
        return
    not_ray = f"{subject} answers but is not a Ray cluster"
    if reply.startswith(b"HTTP/") or reply.lstrip().startswith(b"<"):
        raise AddressError(f"{not_ray} (a web server answers there; a Ray dashboard's "
                           "http://HEAD:8265 takes jobs from raydeep submit --address)")
    if not reply:
        raise AddressError(f"{not_ray} (it sent nothing back to Ray's gRPC greeting "
                           f"within {reply_timeout:g} s)")
    raise AddressError(f"{not_ray} (it does not speak gRPC)")


def check_jobs_server(url: str, origin: str = "", timeout: float = REPLY_TIMEOUT_S + 1) -> str:
    """`url` (named by `origin`: --address, RAY_ADDRESS...) is a Ray Jobs server (Ray's
    dashboard); returns its host for the caller's checks, or raises `AddressError`. Nothing
    secret is sent: no token goes with this request."""
    subject = f"{origin} {url}" if origin else url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise AddressError(f"{subject}: a Jobs server's address is http://HEAD:8265 (or https://), "
                           f"not {parts.scheme}://")
    try:
        port = parts.port
    except ValueError:  # urllib refuses a port out of 0..65535 or not a number
        port = parts.netloc.rpartition(":")[2]
    port = port_number(port, subject) if port is not None else (443 if parts.scheme == "https" else 80)
    if not parts.hostname:
        raise AddressError(f"{subject} has no host (http://HEAD:8265)")
    if parts.netloc.endswith(":"):
        raise AddressError(f"{subject} has no port (http://HEAD:8265)")
    resolve(parts.hostname, port, subject)
    version = f"{parts.scheme}://{parts.netloc}/api/version"
    try:
        with urllib.request.urlopen(version, timeout=timeout) as reply:
            body, status, kind = reply.read(4096), reply.status, reply.headers.get_content_type()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # Ray with token auth on: the token goes with the real client
            return parts.hostname
        raise AddressError(f"{subject} answers but is not a Ray Jobs server "
                           f"(GET /api/version: HTTP {e.code})") from None
    except http.client.HTTPException:  # a reply that is not HTTP: gRPC, say
        raise AddressError(f"{subject} answers but is not a Ray Jobs server (it does not speak HTTP; "
                           "Ray's GCS port? The Jobs server is the dashboard's, usually 8265)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise AddressError(f"{subject} does not answer within {timeout:g} s "
                               "(not a Ray Jobs server?)") from None
        if isinstance(reason, ConnectionRefusedError):
            named = f"{origin}; " if origin and origin != "--address" else ""
            raise AddressError(f"no Ray Jobs server answers at {url} ({named}start one with "
                               "`ray start --head`, or pass --address http://HEAD:8265)") from None
        raise AddressError(f"{subject}: {getattr(reason, 'strerror', None) or reason}") from None
    try:
        ray_version = json.loads(body).get("ray_version") if status == 200 else None
    except (ValueError, AttributeError):
        ray_version = None
    if not ray_version:
        raise AddressError(f"{subject} answers but is not a Ray Jobs server "
                           f"(GET /api/version gave HTTP {status} {kind}, not Ray's version)")
    return parts.hostname

"""Joining a Ray cluster, or starting a local one that ends with the driver.

An --address (or RAY_ADDRESS) that nothing answers fails at once with one line, instead of Ray's
connection warnings repeating for minutes. A local cluster (the embedded default) is stopped by
ray.shutdown() on every exit Python sees (Ray registers it with atexit; its SIGTERM handler exits
through it), and by a small reaper process (runtime/ray_reaper.py) on the ones it does not see
(SIGKILL, SIGHUP, a crash), so none of Ray's processes outlive the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys

from mlapipe.runtime.errors import ClusterUnreachable

CONNECT_TIMEOUT_S = 5.0
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001


def ensure_ray(address: str | None) -> None:
    """Joins the cluster at `address` (or RAY_ADDRESS), else starts a local one: the embedded default."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        check_reachable(address)
    kwargs = {"address": address} if address else {}
    with _startup_notices_at_debug():
        ray.init(log_to_driver=False, configure_logging=False, **kwargs)
    if not address:
        _start_reaper()


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS; None (or "local") for a local one."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


@contextlib.contextmanager
def _startup_notices_at_debug():
    """Ray's start-up notices (the token-authentication one, ...) are warnings on its `ray.*` loggers;
    printed, they land in the middle of the loading bar and the generated text. While ray.init runs
    they are dropped unless mlapipe logs at DEBUG (--log-level DEBUG), and then they show. Ray's errors
    always show."""
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    if not logging.getLogger("mlapipe").isEnabledFor(logging.DEBUG):
        ray_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray_logger.setLevel(level)


def check_reachable(address: str) -> None:
    """Raises ClusterUnreachable unless something accepts a TCP connection at the address's port
    ("auto", which finds a cluster started on this machine, is left to Ray)."""
    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ClusterUnreachable(
            f"cannot reach a Ray cluster at {address} ({host}:{port}: {why}); start one there with "
            "`ray start --head`, or leave --address and RAY_ADDRESS unset to run a local one"
        ) from None


def _host_port(address: str) -> tuple[str, int]:
    scheme, _, rest = address.rpartition("://")
    default = DEFAULT_CLIENT_PORT if scheme == "ray" else DEFAULT_GCS_PORT
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if not port:
        return host or rest, default
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterUnreachable(f"Ray address {address!r}: port {port!r} is not a TCP port")
    return host, int(port)


def _start_reaper() -> None:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_reaper.py")
    # Its stdin is a pipe whose write end only this process holds: the kernel closes it however we exit.
    # A session of its own, so Ctrl-C in the terminal (sent to the foreground group) does not reach it.
    subprocess.Popen(
        [sys.executable, script, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )

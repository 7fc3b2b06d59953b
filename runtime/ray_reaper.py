"""Kills what a driver's local Ray cluster leaves behind when the driver dies without shutting it down.

Run as a script (only the standard library and psutil, nothing of mlapipe) by runtime/ray_local.py:
    python ray_reaper.py DRIVER_PID      with stdin a pipe from the driver

Ray fate-shares its head processes with the driver (the kernel's parent-death signal), but its
dashboard and runtime-env agents wait for the raylet to be gone five checks in a row and then try to
report to the dead GCS with a 60 s timeout, so they outlive a SIGKILLed driver by a minute or more.
This process remembers the driver's descendants (polling twice a second) and, when the pipe closes
(the driver exited, however: the kernel closes it even after SIGKILL), sends SIGTERM to those still
alive, then SIGKILL after a grace period. After a normal exit ray.shutdown() has already stopped them
and there is nothing to do.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import psutil

POLL_S = 0.5
GRACE_S = 2.0


def reap(driver_pid: int) -> None:
    me = psutil.Process()
    known: dict[int, psutil.Process] = {}
    driver_gone = threading.Event()

    def watch_pipe() -> None:
        while sys.stdin.buffer.read(1):  # the driver never writes: read() returns b"" when it is gone
            pass
        driver_gone.set()

    threading.Thread(target=watch_pipe, daemon=True).start()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    while not driver_gone.is_set():
        try:
            for child in driver.children(recursive=True):
                if child.pid != me.pid:
                    known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        driver_gone.wait(POLL_S)
    # psutil checks each Process's start time before signalling it, so a reused pid is never hit.
    alive = [p for p in known.values() if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, still = psutil.wait_procs(alive, timeout=GRACE_S)
    for process in still:
        with contextlib.suppress(psutil.Error):
            process.kill()


if __name__ == "__main__":
    reap(int(sys.argv[1]))

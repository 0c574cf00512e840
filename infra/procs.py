"""Process helpers for the services Destra starts: liveness and stopping."""

from __future__ import annotations

import contextlib
import signal

import psutil


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie awaiting its parent."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_pids(pids: list[int], grace_s: float = 30.0) -> None:
    """SIGTERM processes together, SIGKILL whichever outlives the grace period.

    Together, because a KRaft controller that is stopped last waits for a
    quorum its already-stopped peers can no longer give.
    """
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)

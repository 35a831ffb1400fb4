"""Child processes that never outlive their owner: the nats-server, a local model server.

The kernel kills them if the owner dies, even by SIGKILL (PR_SET_PDEATHSIG), so a
crashed run never leaves a server holding a port. They get a session of their own, so
Ctrl-C reaches the owner only, which then stops them in order.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only).

    Runs in the child between fork and exec, or at the start of a worker's main.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the owner's own cleanup must do
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took hold
        os._exit(1)


def spawn_tied(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` with its output appended to `log_path`, tied to this process's life.

    Call it on a thread that lives as long as the child: PDEATHSIG fires when the thread
    that forked exits, not only the process, so never from a short-lived worker thread.
    """
    parent = os.getpid()
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; True if it was still running."""
    if proc is None or proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return True

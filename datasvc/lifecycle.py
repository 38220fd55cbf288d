"""Worker processes that never outlive their parent, and whether a process is still there."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux), so a parent killed
    with -9 leaves no worker behind; exit now if the parent is already gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux/glibc: workers notice EOF on their queues
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: it is not ours to clean up)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Ending a torchrun job on an expected failure with one line per rank, not torchrun's report.

torchrun turns any non-zero exit of a rank into a ``ChildFailedError`` traceback of its own
(~40 lines) and has no option to leave it out; the signals it handles (SIGTERM, SIGINT, SIGHUP,
SIGQUIT) end in a traceback too. A signal it does not handle ends it silently. So a rank that
failed for a reason the user can fix, after printing its one line, stops the job itself:
SIGUSR1 to its torchrun agent (which then exits with status 128 + 10 = 138, printing nothing),
then SIGTERM to its sibling ranks, which would otherwise be left running without a parent.

Only on a single node, only when torchrun may not restart the workers (``--max-restarts 0``, its
default: a restart is the user's choice), only when the parent really is torchrun, and never
with ``DATASVC_DEBUG=1`` (which keeps torchrun's full report).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import time

log = logging.getLogger(__name__)

QUIET_END_SIGNAL = signal.SIGUSR1
TORCHRUN_EXIT_STATUS = 128 + QUIET_END_SIGNAL  # what a shell sees of the job
_LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _torchrun_agent():
    """The parent torchrun agent of this rank, when it may be ended quietly; else None."""
    import psutil

    env = os.environ
    if not under_torchrun() or env.get("GROUP_WORLD_SIZE", "1") != "1":
        return None  # other nodes' agents would not learn of it: keep torchrun's handling
    if env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
        return None
    if QUIET_END_SIGNAL.name in env.get("TORCHELASTIC_SIGNALS_TO_HANDLE", ""):
        return None  # this torchrun would turn the signal into a traceback as well
    try:
        parent = psutil.Process(os.getppid())
        cmdline = " ".join(parent.cmdline())
    except psutil.Error:
        return None
    return parent if any(name in cmdline for name in _LAUNCHERS) else None


def _stderr_is_a_file() -> bool:
    try:
        return stat.S_ISREG(os.fstat(sys.stderr.fileno()).st_mode)
    except (OSError, ValueError):
        return False


def end_torchrun_job() -> bool:
    """Stop this rank's torchrun agent and sibling ranks without torchrun's failure report.

    Call it after the rank printed its error line; returns whether the job was ended (the rank
    then exits as it would have). Does nothing outside a torchrun job it may end.
    """
    from datasvc.errors import debug_requested

    if debug_requested():
        return False
    agent = _torchrun_agent()
    if agent is None:
        return False
    import psutil

    try:
        siblings = [p for p in agent.children() if p.pid != os.getpid()]
    except psutil.Error:
        return False
    if _stderr_is_a_file():
        time.sleep(0.5)  # torchrun --tee/--redirects: let the agent copy the line to the console
    try:
        agent.send_signal(QUIET_END_SIGNAL)
    except psutil.Error:
        return False
    for p in siblings:
        try:
            p.terminate()
        except psutil.Error:
            pass
    log.debug("ended torchrun agent %d and %d sibling ranks", agent.pid, len(siblings))
    return True

"""Expected failures: one exception type for what a user can fix, one handler that prints it.

Library code raises ``UserError(cause, hint)`` (or a subclass: ``PackError``, ``ConversionError``,
``ConfigError`` …). The entry points (``datasvc``, ``python -m trainer``) run each command through
``run_command``, which turns an expected failure into one line on stderr,

    datasvc <command>: error: <cause> (<what to do>)

and an exit code: 1, or 2 for usage errors (``UsageError``, as argparse does). Nothing else is
printed: no traceback, unless ``--debug`` (or ``DATASVC_DEBUG=1``) asks for it. Anything else that
escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

DEBUG_ENV = "DATASVC_DEBUG"

# OSErrors that name a path are the user's environment, not a bug: a missing file, a read-only
# folder, a full disk. Others (a refused socket, a broken pipe inside a library) keep a traceback.
_PATH_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOSPC,
    errno.EROFS,
    errno.ELOOP,
    errno.ENAMETOOLONG,
    errno.EDQUOT,
}


class UserError(Exception):
    """A failure the user can fix: ``cause`` says what is wrong, ``hint`` what to do about it.

    ``str(e)`` is the whole one-line message, so code that prints ``{e}`` keeps the hint.
    """

    exit_code = 1

    def __init__(self, cause: str, hint: str | None = None, *, exit_code: int | None = None):
        super().__init__(cause)
        self.cause = str(cause)
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.cause} ({self.hint})" if self.hint else self.cause


class UsageError(UserError, ValueError):
    """A command line, argument or configuration that cannot work as given: exit code 2, like
    argparse. A ``ValueError`` too, so library callers catch it as a bad value."""

    exit_code = 2


def debug_requested(argv_flag: bool = False) -> bool:
    """``--debug`` on the command line or ``DATASVC_DEBUG=1`` in the environment (any rank)."""
    return argv_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(text: str) -> str:
    """Collapse a multi-line message into one line (an error report is one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe_os_error(e: OSError) -> str:
    """``<strerror>: <path>`` (and the second path of a rename), without Python's ``[Errno N]``."""
    what = e.strerror or type(e).__name__
    if e.filename is None:
        return what
    if getattr(e, "filename2", None):
        return f"{what}: {e.filename} -> {e.filename2}"
    return f"{what}: {e.filename}"


def expected_failure(e: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of an expected failure, or None for a bug."""
    if isinstance(e, UserError):
        return str(e), e.exit_code
    if isinstance(e, OSError) and e.filename is not None and e.errno in _PATH_ERRNOS:
        return describe_os_error(e), 1
    return None


def report(prefix: str, message: str) -> None:
    """Print ``<prefix>: error: <message>`` as one line on stderr."""
    print(f"{prefix}: error: {one_line(message)}", file=sys.stderr, flush=True)


def run_command(
    prefix: str,
    fn: Callable[[], int | None],
    *,
    debug: bool = False,
    after_report: Callable[[], object] | None = None,
) -> int:
    """Run one command; an expected failure becomes one line on stderr and its exit code.

    Args:
        prefix: what names the command in the message, e.g. ``"datasvc inspect"``.
        fn: the command; returns an exit code (None means 0).
        debug: re-raise expected failures, so that their traceback is shown.
        after_report: called once an expected failure was reported (the trainer ends its
            torchrun job there).
    """
    debug = debug_requested(debug)
    try:
        return fn() or 0
    except KeyboardInterrupt:
        if debug:
            raise
        report(prefix, "interrupted")
        return 130
    except Exception as e:
        found = expected_failure(e)
        if found is None or debug:
            raise
        message, code = found
        log.debug("expected failure", exc_info=True)
        report(prefix, message)
        if after_report is not None:
            after_report()
        return code

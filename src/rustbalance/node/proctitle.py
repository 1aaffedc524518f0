"""Make the daemon findable as ``rustbalance`` (spec Phase 1.1: ``kill -9 $(pidof rustbalance)``).

What ``pidof`` reads (Debian 12: ``/usr/bin/pidof`` is sysvinit's ``killall5``): it compares the
program name with the basename of ``argv[0]`` from ``/proc/<pid>/cmdline``, and falls back to the
``comm`` name of ``/proc/<pid>/stat`` only for scripts (``-x``) or when ``argv[0]`` contains a
space. A Python daemon's ``argv[0]`` is the interpreter (``.../python``), also when started by
the ``rustbalance`` console script (the kernel runs the shebang interpreter), so neither the
console script name nor ``prctl(PR_SET_NAME)`` alone is enough for a plain ``pidof``.

So, as ``setproctitle`` does (it is not a dependency), we:

1. set ``comm`` with ``prctl(PR_SET_NAME)`` (``ps -o comm``, ``top``, ``pgrep``), and
2. rewrite the process's own argument area (``arg_start``..``arg_end`` from
   ``/proc/self/stat``, proc(5) fields 48-49) in place to ``rustbalance <args>``: that memory is
   what the kernel returns as ``/proc/<pid>/cmdline``. We only write inside that area, never past
   it, and pad with NUL bytes so the kernel reads it as plain arguments.

Both steps are best effort: a failure is logged at DEBUG and the daemon runs on.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PROCESS_NAME", "set_process_title"]

log = logging.getLogger(__name__)

PROCESS_NAME = "rustbalance"
_PR_SET_NAME = 15  # linux/prctl.h
_COMM_MAX = 15  # TASK_COMM_LEN - 1
# proc(5): fields 48 and 49 of /proc/<pid>/stat; after the ")" closing the comm field the
# first token is field 3, so field N is token N - 3.
_ARG_START_TOKEN = 48 - 3
_ARG_END_TOKEN = 49 - 3


def _set_comm(name: str) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_NAME, name.encode()[:_COMM_MAX], 0, 0, 0)) == 0
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_NAME) failed: %s", exc)
        return False


def _rewrite_cmdline(argv: Sequence[str]) -> bool:
    try:
        stat = Path("/proc/self/stat").read_bytes()
        tokens = stat.rpartition(b")")[2].split()
        start, end = int(tokens[_ARG_START_TOKEN]), int(tokens[_ARG_END_TOKEN])
    except (OSError, IndexError, ValueError) as exc:
        log.debug("cannot locate the argument area: %s", exc)
        return False
    size = end - start
    if start <= 0 or size <= len(PROCESS_NAME):
        return False
    title = b"\0".join(arg.encode("utf-8", errors="replace") for arg in argv)
    if len(title) >= size:
        # Keep whole arguments only; the program name always fits (checked above).
        title = PROCESS_NAME.encode()
    ctypes.memmove(start, title + b"\0" * (size - len(title)), size)
    return True


def set_process_title(args: Sequence[str]) -> None:
    """Show this process as ``rustbalance <args>`` to ``pidof``, ``ps`` and ``top``."""
    comm = _set_comm(PROCESS_NAME)
    cmdline = _rewrite_cmdline([PROCESS_NAME, *args])
    log.debug("process title set (comm: %s, cmdline: %s)", comm, cmdline)

"""How many file descriptors the proxy needs, and raising RLIMIT_NOFILE to fit.

A proxied connection holds two sockets (client and target; an idle http keep-alive client
only one) and, while bytes move in tcp mode, splice pipes from a small pool. Up to
``max_connections`` more clients may be connected that the proxy has not read yet (the front
door admits them to twice the cap until they are found busy or waiting: admission.py), one
socket each: three descriptors per ``max_connections`` in all. Debian's default
soft limit is 1024 while the hard limit is usually far higher (systemd: 524288), so a node
configured for thousands of connections would hit EMFILE at about 500 of them. Like most
servers, we raise the soft limit to the hard one at start (no privilege needed) and warn when
even the hard limit is below what ``proxy.max_connections`` may need. The planner is pure;
:func:`raise_nofile_limit` is the thin shell around ``setrlimit``.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("rustbalance.proxy")

# Descriptors beyond the proxied sockets: tor control, coordination, status and metrics
# sockets, logs, the pooled splice pipes (64 x 2) and headroom.
BASE_DESCRIPTORS = 256
PER_CONNECTION = 3


def descriptors_needed(max_connections: int) -> int:
    return PER_CONNECTION * max_connections + BASE_DESCRIPTORS


@dataclass(frozen=True)
class NofilePlan:
    new_soft: int | None  # None: leave the limit as it is
    warning: str | None


def plan_nofile(soft: int, hard: int, max_connections: int) -> NofilePlan:
    """Raise the soft limit to the hard one when it is below what is needed (``hard`` may be
    ``resource.RLIM_INFINITY``, -1); warn when the hard limit itself is too low."""
    needed = descriptors_needed(max_connections)
    unlimited = hard == resource.RLIM_INFINITY
    new_soft: int | None = None
    if soft != resource.RLIM_INFINITY and soft < needed:
        # An infinite hard limit cannot be a soft one on Linux (nr_open caps it): ask for
        # exactly what is needed then. A hard limit at the soft one leaves nothing to raise.
        if unlimited:
            new_soft = needed
        elif hard > soft:
            new_soft = hard
    warning = None
    if not unlimited and hard < needed:
        warning = (
            f"proxy.max_connections = {max_connections} needs about {needed} file "
            f"descriptors, but the hard limit (RLIMIT_NOFILE) is {hard}: connections beyond "
            f"about {max(0, (hard - BASE_DESCRIPTORS) // PER_CONNECTION)} will fail. Raise it "
            "(systemd: LimitNOFILE=) or lower proxy.max_connections"
        )
    return NofilePlan(new_soft, warning)


def raise_nofile_limit(max_connections: int) -> int:
    """Apply :func:`plan_nofile` to this process; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_nofile(soft, hard, max_connections)
    if plan.new_soft is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.new_soft, hard))
            log.info("Raised the open-files limit from %d to %d", soft, plan.new_soft)
            soft = plan.new_soft
        except (ValueError, OSError) as exc:
            log.warning("Could not raise the open-files limit from %d: %s", soft, exc)
    if plan.warning is not None:
        log.warning("%s", plan.warning)
    return soft

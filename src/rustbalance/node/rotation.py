"""When tor's descriptors change under a node: time-period starts and shared-random runs.

Pure (times in, decisions out). tor moves on two boundaries (docs/architecture.md, "Descriptor
rotation and time periods"):

- a new shared-random run (00:00 UTC live, every 24 voting intervals on a test network): tor
  rotates its descriptors when the first consensus of the run arrives (hs_service.c
  ``should_rotate_descriptors`` / ``rotate_service_descriptors``): ``desc_next`` becomes
  ``desc_current``, the old ``desc_current``'s intro circuits are closed, a new ``desc_next``
  is built with new intro points;
- a new time period (12:00 UTC live, 12 voting intervals after the run start): clients drop
  every cached descriptor of the old period (hs_cache.c ``cache_client_desc_new`` sets the
  expiry to the next period start) and fetch the new period's, which is tor's ``desc_next``
  until the next run start. An instance node must switch to its own ``desc_next`` at once
  (own_descriptor.py): a client that fetches the master descriptor before the switch keeps
  intro points that die at the next rotation, for the rest of the period.

:func:`next_boundary` gives the next of the two after a consensus; :func:`network_poll_delay`
how long the node may wait before looking at the consensus again, so that it notices either
boundary within ``FAST_POLL_SECS`` of the consensus that crosses it.
"""

from __future__ import annotations

from typing import Literal

from rustbalance.crypto.time_period import (
    TimeParams,
    srv_run_start,
    time_period_num,
    time_period_start,
)

__all__ = [
    "FAST_POLL_SECS",
    "Boundary",
    "BoundaryKind",
    "boundary_of",
    "network_poll_delay",
    "next_boundary",
]

# Once a boundary is due, the consensus is checked this often until one past it is seen.
FAST_POLL_SECS = 1.0

# (time period, start of the shared-random run) a consensus belongs to.
Boundary = tuple[int, int]
# Which of the two changed: a new time period, or a new shared-random run (tor rotated).
BoundaryKind = Literal["period", "run"]


def boundary_of(valid_after: int, params: TimeParams) -> Boundary:
    """The (time period, shared-random run start) of a consensus: when either changes, tor
    rotated its descriptors (the run) or clients moved to the next period's (the period)."""
    return time_period_num(valid_after, params), srv_run_start(valid_after, params)


def next_boundary(valid_after: int, params: TimeParams) -> int:
    """Unix time of the first shared-random run start or time-period start after the
    consensus ``valid_after`` (hs_common.c ``hs_get_start_time_of_next_time_period``;
    shared_random_client.c ``sr_state_get_start_time_of_current_protocol_run``)."""
    run = srv_run_start(valid_after, params) + params.srv_run_seconds
    period = time_period_start(time_period_num(valid_after, params) + 1, params)
    return min(run, period)


def network_poll_delay(valid_after: int, params: TimeParams, now: float, idle: float) -> float:
    """Seconds to wait before reading the consensus again: ``idle`` while no boundary is due,
    less when one comes sooner, and :data:`FAST_POLL_SECS` from the moment it is due until a
    consensus past it arrives (its valid-after is the boundary itself)."""
    due = next_boundary(valid_after, params)
    if now >= due:
        return FAST_POLL_SECS
    return max(FAST_POLL_SECS, min(idle, due - now))
